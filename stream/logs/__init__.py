"""Log anomalies on the serving side: raw lines to log keys (templates or drain3), the DeepLog key scorer
on ONNX, and ``logs serve``, the log-key consumer.

May import the Kafka edge (``fabwatch.stream.kafka``), the scoring core's windows and ``fabwatch.export``;
never TensorFlow (the DeepLog model is trained in ``fabwatch.models.deeplog``).
"""
