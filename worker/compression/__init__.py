"""Compression methods. Each takes an ONNX file and a step, and writes a new ONNX file."""
