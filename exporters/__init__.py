"""Exporters: ONNX export, parity checks, bundle writing."""
