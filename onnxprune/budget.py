"""The memory budget (--max-memory) and the decisions it drives.

The data-free methods stream a model with external data in fixed-size chunks, so their memory
does not depend on the model or its tensors. What would need more is done only when it fits
the budget: running the whole model in onnxruntime to verify it, keeping its sparse tensors
inline (see storage), and holding every layer's calibration statistics at once (otherwise they
are collected in several passes, see calibration.collect.calibration_groups).
"""
from __future__ import annotations

import re

from .errors import OnnxPruneError

DEFAULT = 1 << 30
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """Bytes from '1G', '1.5GB', '512M', '800MiB' or a plain number of bytes (binary units)."""
    if isinstance(text, int) and text > 0:
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()]) if match else 0
    if size <= 0:
        raise OnnxPruneError(f"--max-memory expects a size like 1G or 512M, got '{text}'")
    return size


def describe(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def verification_note(weight_bytes: int, budget: int) -> str | None:
    """Why onnxruntime should not load a model of `weight_bytes` of weights, or None."""
    if weight_bytes <= budget:
        return None
    return (f"not verified in onnxruntime: it would load all {describe(weight_bytes)} of weights, "
            f"more than the memory budget of {describe(budget)} (raise it with --max-memory)")
