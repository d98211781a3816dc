"""Benchmarks of the serving path: raw Kafka produce/consume (``kafka``), the processor end to end
(``stream``), and the tiny ONNX models they score with (``tiny_models``). They print numbers; tests
never time anything.
"""
