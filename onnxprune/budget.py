"""The memory budget (--max-memory) and the decisions it drives.

The data-free methods stream a model with external data in fixed-size chunks, so their memory
does not depend on the model or its tensors. What would need more is done only when it fits
the budget: running the whole model in onnxruntime to verify it, keeping its sparse tensors
inline (see storage), and holding every layer's calibration statistics at once (otherwise they
are collected in several passes, see calibration.collect.calibration_groups).
The command line also asks the C allocator to keep freed memory for reuse (keep_freed_memory).
"""
from __future__ import annotations

import ctypes
import numbers
import re

from .errors import OnnxPruneError

DEFAULT = 1 << 30
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """Bytes from '1G', '1.5GB', '512M', '800MiB' or a plain number of bytes (binary units)."""
    if isinstance(text, bool) or not isinstance(text, (str, numbers.Integral)):
        raise OnnxPruneError(f"--max-memory expects a size like 1G or 512M, got {text!r}")
    if isinstance(text, numbers.Integral) and text > 0:
        return int(text)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()]) if match else 0
    if size <= 0:
        raise OnnxPruneError(f"--max-memory expects a size like 1G or 512M, got '{text}'")
    return size


def describe(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.{0 if n >= 10 * size else 1}f} {unit}"
    return f"{n} bytes"


def verification_note(weight_bytes: int, budget: int) -> str | None:
    """Why onnxruntime should not load a model of `weight_bytes` of weights, or None."""
    if weight_bytes <= budget:
        return None
    return (f"not verified in onnxruntime: it would load all {describe(weight_bytes)} of weights, "
            f"more than the memory budget of {describe(budget)} (raise it with --max-memory)")


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Let glibc's malloc reuse freed blocks of up to `limit` bytes instead of handing them back
    to the kernel (M_MMAP_THRESHOLD and M_TRIM_THRESHOLD). The calibrated methods allocate and
    free many large temporaries (a 3136-wide Gram is 80 MB); memory handed back comes back as
    fresh pages, and on VMs that pass freed pages on to the host (free page reporting) touching
    them again cost ~12 ms per MB on our CI machine: ltp --refit on the reference CNN, five
    levels, 57.9 -> 45.1 s, DC 25.8 -> 23.7 s. Peak RSS stayed within a few % on the reference
    models (the heap can fragment where mmap'ed blocks could not). Returns whether both settings
    took effect (False off glibc; older glibc may refuse thresholds above 32 MiB)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (TypeError: Windows' CDLL(None))
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mmap_set = bool(mallopt(M_MMAP_THRESHOLD, limit))
    trim_set = bool(mallopt(M_TRIM_THRESHOLD, limit))
    return mmap_set and trim_set
