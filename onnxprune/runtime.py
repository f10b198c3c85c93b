"""onnxruntime sessions: one place that picks the execution provider."""
from __future__ import annotations

import os
import re

import ml_dtypes  # onnx depends on it: the numpy types of bfloat16 and float8
import numpy as np
import onnxruntime as ort
from onnx import TensorProto

from .errors import OnnxPruneError, one_line

DEVICES = ("auto", "cpu", "cuda")
ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint64)": np.uint64, "tensor(uint32)": np.uint32,
    "tensor(uint16)": np.uint16, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
    "tensor(bfloat16)": ml_dtypes.bfloat16,
}
# numpy types onnxruntime's Python API cannot take ("Numpy_type 256 can't be converted"): fed
# as their raw bits, tagged with the ONNX type
_RAW_FEEDS = {np.dtype(ml_dtypes.bfloat16): (np.uint16, TensorProto.BFLOAT16)}


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise OnnxPruneError(f"unknown device '{device}' (choose from {', '.join(DEVICES)})")


def providers_for(device: str) -> list[str]:
    check_device(device)
    if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(model: str | os.PathLike | bytes, device: str = "auto", light: bool = False,
                 options: ort.SessionOptions | None = None, optimize: bool = True) -> ort.InferenceSession:
    """A session on the requested device; CUDA falls back to CPU when it cannot start.

    Models with external data must be given by path so onnxruntime finds their data files (or
    as bytes with their data files in `options`: external_session). The provider that really
    runs is `session.get_providers()[0]`. A `light` session (for one-off runs) skips graph
    rewrites and weight prepacking, which cost time and a second copy of the weights.
    `optimize=False` turns onnxruntime's graph rewrites off (see calibration.collect).
    """
    providers = providers_for(device)  # an unknown device is the caller's error, not the model's
    options = options or ort.SessionOptions()
    options.log_severity_level = 4  # its warnings and errors off the terminal: ours say them
    if light:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.add_session_config_entry("session.disable_prepacking", "1")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types; keep one line
        if not isinstance(model, bytes) and _EXTERNAL_SHAPES in str(e):
            return _with_small_tensors_inline(model, device, light, optimize)
        raise OnnxPruneError(f"onnxruntime cannot load the model: {load_error(e)}") from None


# onnxruntime's shape inference reads Reshape's shape (and the like) from the proto only: a model
# saved with every tensor external (onnx.save(..., size_threshold=0)) does not load by path
_EXTERNAL_SHAPES = "Cannot parse data from external tensors"


def _with_small_tensors_inline(path, device: str, light: bool, optimize: bool) -> ort.InferenceSession:
    from .external_session import session_for  # (it builds on this module)
    from .modelio import load_model

    return session_for(load_model(path).model, device, light=light, optimize=optimize)


_IR_TOO_NEW = re.compile(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)")
_OPSET_TOO_NEW = re.compile(r"Opset (\d+) is under development.*support for domain (\S+) is till opset (\d+)")
_SOURCE_LINE = re.compile(r"/onnxruntime_src/\S+:\d+ ")  # then the throwing function's C++ signature


def load_error(e: BaseException) -> str:
    """onnxruntime's load error in words: a too-new IR version or opset said plainly, else its
    text without the source line and C++ signature it embeds."""
    text = " ".join(str(e).split())
    if m := _IR_TOO_NEW.search(text):
        return f"unsupported model IR version {m[1]} (this onnxruntime reads at most {m[2]})"
    if m := _OPSET_TOO_NEW.search(text):
        return f"opset {m[1]} of domain {m[2]} is newer than this onnxruntime supports (at most {m[3]})"
    if m := _SOURCE_LINE.search(text):
        depth = 0
        for i in range(m.end(), len(text)):  # the signature ends where its parameter list closes
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if text[i] == ")" and depth == 0:
                text = f"{text[:m.start()]} {text[i + 1:].lstrip()}"
                break
    return one_line(text)


def run(session: ort.InferenceSession, outputs: list[str] | None, feeds: dict) -> list:
    """session.run, with what onnxruntime only finds while running (an index out of range, a
    shape the graph cannot take) as one line."""
    try:
        return session.run(outputs, {name: _feedable(value) for name, value in feeds.items()})
    except Exception as e:
        raise OnnxPruneError(f"onnxruntime failed to run the model on the data: {one_line(e)}") from None


def _feedable(value):
    raw = _RAW_FEEDS.get(getattr(value, "dtype", None))
    if raw is None:
        return value
    bits, onnx_type = raw
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
        np.ascontiguousarray(value).view(bits), onnx_type)



def device_note(device: str) -> str | None:
    """What to tell a user who asked for CUDA where onnxruntime has none."""
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return ("--device cuda: this onnxruntime has no CUDA execution provider (that needs the "
                "onnxruntime-gpu package and a GPU); everything ran on the CPU")
    return None


def provider_name(session: ort.InferenceSession) -> str:
    return session.get_providers()[0].removesuffix("ExecutionProvider")


def session_inputs(session: ort.InferenceSession) -> list[tuple]:
    """The inputs as (name, numpy dtype, shape with None/str for symbolic dims)."""
    out = []
    for arg in session.get_inputs():
        if arg.type not in ORT_TYPES:
            raise OnnxPruneError(f"input '{arg.name}' has unsupported type {arg.type}")
        out.append((arg.name, np.dtype(ORT_TYPES[arg.type]), list(arg.shape)))
    return out
