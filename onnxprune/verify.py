"""Check that a pruned model loads and runs in onnxruntime, and how far its outputs moved."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .data import random_array
from .errors import OnnxPruneError, one_line
from .metrics import output_change
from .runtime import make_session, provider_name, run, session_inputs

def synthetic_inputs(session: ort.InferenceSession, dims: dict[str, int] | None = None,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the right shape and type: symbolic dims become dims[name] or 1.

    Values as data.random_array makes them.
    """
    sizes = symbolic_sizes(session, dims)
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, dtype, arg_shape in session_inputs(session):
        shape = [d if isinstance(d, int) and d >= 0 else sizes.get(d, 1) for d in arg_shape]
        feeds[name] = random_array(dtype, shape, rng)
    return feeds


def symbolic_sizes(session: ort.InferenceSession, dims: dict[str, int] | None) -> dict[str, int]:
    """The size each named symbolic dimension of the inputs gets: dims[name], else 1."""
    return {d: (dims or {}).get(d, 1) for _, _, shape in session_inputs(session)
            for d in shape if isinstance(d, str)}


def compare_models(reference, candidate, *, dims=None, device="auto") -> dict:
    """Run both models (paths, or bytes under 2 GB) on one synthetic batch.

    Raises OnnxPruneError when the candidate does not load or run although the reference does,
    or gives NaN / inf where the reference is finite.
    When the reference cannot run here either (an operator or type this onnxruntime build
    lacks, e.g. bfloat16 MatMul on CPU), nothing is compared and the result says why.
    """
    try:
        provider, names, feeds, outputs, used = _run(candidate, device, dims)
    except Exception as e:
        try:
            _run(reference, device, dims)
        except Exception as input_error:
            return {"provider": None, "max_abs_diff": {}, "note": "not run in onnxruntime: the "
                    f"input model does not run here either ({_reason(input_error)})"}
        raise OnnxPruneError(f"the pruned model does not run in onnxruntime: {_reason(e)}") from None
    result = {"provider": provider, "max_abs_diff": {}, "note": None, "symbolic_dims": used}
    try:
        ref_outputs = _run(reference, device, dims, feeds)[3]
    except Exception as e:  # the input model itself does not run on synthetic data
        result["note"] = f"the input model did not run on synthetic inputs: {one_line(e)}"
        return result
    remarks = []
    for name, ref_value, out_value in zip(names, ref_outputs, outputs):
        ref, out = comparable(ref_value), comparable(out_value)
        if ref is None or out is None:
            remarks.append(f"output '{name}' not compared (not a numeric tensor)")
        elif ref.shape != out.shape or _part_shapes(ref_value) != _part_shapes(out_value):
            remarks.append(f"output '{name}' not compared (its shape changed)")
        elif not np.issubdtype(ref.dtype, np.floating):  # labels, indices: a count, not a size
            changed = int(np.count_nonzero(ref != out))
            remarks.append(f"output '{name}': {changed} of {ref.size} values changed")
        elif ref.size:
            broken, largest, _ = output_change(ref, out)
            if broken.any():  # the pruning broke the model: not a result to write
                raise OnnxPruneError(
                    f"the pruned model's output '{name}' has {int(broken.sum())} NaN or infinite values "
                    "where the input model's are finite (--no-verify, verify=False in the API, skips this check)")
            result["max_abs_diff"][name] = largest
    result["note"] = "; ".join(remarks) or None
    return result


def comparable(value) -> np.ndarray | None:
    """An output as one numeric array, or None: a tensor as it is, a sequence of maps (a
    classifier's per-class scores, as skl2onnx's ZipMap writes them) as rows in key order,
    a sequence of tensors flattened end to end."""
    if isinstance(value, np.ndarray):
        return value if value.dtype.kind in "biuf" else None
    if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
        keys = sorted(value[0])
        if any(sorted(row) != keys for row in value):
            return None
        try:
            return np.array([[row[k] for k in keys] for row in value], dtype=np.float64)
        except (TypeError, ValueError):
            return None
    if isinstance(value, list) and all(isinstance(part, np.ndarray) for part in value):
        if any(part.dtype.kind not in "biuf" for part in value):
            return None
        return np.concatenate([part.reshape(-1) for part in value]) if value else np.empty(0)
    return None


def _part_shapes(value) -> list | None:
    """The shapes of a sequence's tensors: parts of (2, 3) and (3, 2) are not the same output."""
    return [np.shape(part) for part in value] if isinstance(value, list) else None


def _run(model, device, dims, feeds=None):
    """(provider, output names, feeds, outputs, symbolic sizes) of one run on `feeds`, or on a
    synthetic batch. The session goes when this returns: one model in onnxruntime at a time."""
    session = make_session(model, device, light=True)
    feeds = synthetic_inputs(session, dims) if feeds is None else feeds
    outputs = run(session, None, feeds)
    return (provider_name(session), [o.name for o in session.get_outputs()], feeds, outputs,
            symbolic_sizes(session, dims))


def _reason(e: Exception) -> str:
    return one_line(e).removeprefix("onnxruntime cannot load the model: ")


