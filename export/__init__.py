"""The boundary between training and serving: ONNX export and parity, the model registry, and the
onnxruntime session factory. Only ``fabwatch.export.onnx_export`` imports TensorFlow (lazily)."""
