"""What the stream loops share about their outputs: dead letters built from the original message, and
delivery tracking so offsets are never committed past an output that was not delivered."""

from __future__ import annotations

import base64

from confluent_kafka import KafkaError, Message, Producer

from fabwatch.stream.schemas import DeadLetter, RejectReason, SourceOffset


def produce_waiting(producer: Producer, topic: str, value: bytes, key: bytes | None = None, **kwargs) -> None:
    """Produce, and when the local queue is full wait for deliveries to drain instead of failing."""
    while True:
        try:
            producer.produce(topic, value, key, **kwargs)
            return
        except BufferError:
            producer.poll(0.05)


class DeliveryFailed(RuntimeError):
    """An output could not be delivered: do not commit, exit non-zero, let the restart redo the batch."""


def dead_letter(m: Message, reason: RejectReason, detail: str, now_ms: int) -> DeadLetter:
    """The DLQ record of ``m``: its original bytes, key and position, and why it was unusable."""
    key = m.key()
    return DeadLetter(value_b64=base64.b64encode(m.value() or b"").decode(),
                      key=key.decode(errors="replace") if key is not None else None,
                      source=SourceOffset(topic=m.topic(), partition=m.partition(), offset=m.offset()),
                      reason=reason, detail=detail, ts=now_ms)


class DeliveryTracker:
    """Pass ``on_delivery`` to every produce; ``flush_or_raise`` before committing offsets."""

    def __init__(self) -> None:
        self.error: KafkaError | None = None

    def on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self.error = err

    def flush_or_raise(self, producer: Producer, timeout_s: float = 30.0) -> None:
        remaining = producer.flush(timeout_s)
        if remaining or self.error is not None:
            raise DeliveryFailed(f"outputs not delivered ({remaining} pending, error: {self.error}); "
                                 "offsets not committed")
