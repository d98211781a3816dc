"""Files in and out of the stream: reading CSV / Parquet / JSONL with one column mapping, replay into
Kafka, and offline evaluation with the processor's own engine (so offline and live give the same alerts).

May import the scoring core and the Kafka edge; never TensorFlow.
"""
