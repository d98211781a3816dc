"""The sidecar trainer: a Parquet store of what flowed through Kafka (``store``) and the retrain, gate
and promote loop (``trainer``). TensorFlow loads only when a retrain starts.
"""
