"""onnxruntime sessions: one place that picks the execution provider."""
from __future__ import annotations

import os

import onnxruntime as ort

from .errors import OnnxPruneError

DEVICES = ("auto", "cpu", "cuda")


def providers_for(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device not in DEVICES:
        raise OnnxPruneError(f"unknown device '{device}' (choose from {', '.join(DEVICES)})")
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(model: str | os.PathLike | bytes, device: str = "auto",
                 threads: int | None = None, light: bool = False) -> ort.InferenceSession:
    """A session on the requested device; CUDA falls back to CPU when it cannot start.

    Models with external data must be given by path so onnxruntime finds their data files.
    The provider that really runs is `session.get_providers()[0]`. A `light` session (for
    one-off runs) skips graph rewrites and weight prepacking, which cost time and a second
    copy of the weights.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3  # keep onnxruntime's warnings off the user's terminal
    if threads:
        options.intra_op_num_threads = threads
    if light:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.add_session_config_entry("session.disable_prepacking", "1")
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=providers_for(device))
    except Exception as e:  # onnxruntime raises its own exception types; keep one line
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxPruneError(f"onnxruntime cannot load the model: {message}") from None


def provider_name(session: ort.InferenceSession) -> str:
    return session.get_providers()[0].removesuffix("ExecutionProvider")
