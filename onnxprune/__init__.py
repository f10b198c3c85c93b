"""onnxprune: prune the weights of ONNX models (magnitude, Global MP + MT, DC, LTP)."""

__version__ = "0.1.0"
