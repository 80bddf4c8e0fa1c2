"""Lung-imaging model library: registry, data, preprocessing, training, export and scoring.

Pure library code: nothing here imports Prefect. Heavy dependencies (TensorFlow, ONNX Runtime)
are imported inside the functions that need them so that light modules stay fast to import.
"""
