"""onnxprune: prune the weights of ONNX models (magnitude, Global MP + MT, DC, LTP)."""

__version__ = "0.1.0"

from .errors import InfeasibleError, OnnxPruneError  # noqa: E402
from .prune import PruneResult, prune  # noqa: E402

__all__ = ["prune", "PruneResult", "OnnxPruneError", "InfeasibleError", "__version__"]
