"""Export of a detector checkpoint to ONNX / ONNX INT8 / TensorRT, with sidecar and parity checks."""
