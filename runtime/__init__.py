"""Edge runtime: sources -> preprocess -> infer -> postprocess -> sinks.

Imports only numpy, OpenCV, onnxruntime and (optionally) tensorrt; never torch, never the
training side.
"""
