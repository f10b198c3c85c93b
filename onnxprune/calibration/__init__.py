"""Calibration data and per-layer statistics collected through onnxruntime."""
