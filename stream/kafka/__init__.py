"""The Kafka edge: settings, the local broker (and its Maven recipe, shipped as package data), topic
creation, produce and dead-letter helpers, and signal handling for the consume loops.

Broker calls that must ride out a leader move are retried by ``retry``.

Imports only the standard library, confluent-kafka, pydantic and ``fabwatch.export.errors``: never the
scoring core, never TensorFlow.
"""
