"""Pruning methods: pure numpy functions on arrays. Nothing here imports onnx."""
