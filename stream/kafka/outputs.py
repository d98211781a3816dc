"""What the stream loops share about their outputs: dead letters built from the original message, and
delivery tracking so offsets are never committed past an output that was not delivered."""

from __future__ import annotations

import base64
import hashlib
import logging
from typing import Callable

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from fabwatch.stream.schemas import DeadLetter, RejectReason, SourceOffset

log = logging.getLogger("fabwatch.outputs")


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


MAX_DEAD_LETTER_VALUE_BYTES = 512 * 1024  # kept bytes of a message: as base64 (x 4/3) with the envelope, a
# dead letter stays under the 1 MB message.max.bytes of librdkafka and of the broker by default
MAX_DEAD_LETTER_KEY_BYTES = 1024  # a huge key would overflow the dead letter just the same


def dead_letter(m: Message, reason: RejectReason, detail: str, now_ms: int,
                keep_bytes: int = MAX_DEAD_LETTER_VALUE_BYTES) -> DeadLetter:
    """The DLQ record of ``m``: its original bytes (the first ``keep_bytes`` of them, with the whole
    message's length and sha256), key and position, and why it was unusable."""
    value, key = m.value() or b"", m.key()
    return DeadLetter(value_b64=base64.b64encode(value[:keep_bytes]).decode(), value_bytes=len(value),
                      value_sha256=hashlib.sha256(value).hexdigest(), truncated=len(value) > keep_bytes,
                      key=key[:MAX_DEAD_LETTER_KEY_BYTES].decode(errors="replace") if key is not None else None,
                      source=SourceOffset(topic=m.topic(), partition=m.partition(), offset=m.offset()),
                      reason=reason, detail=detail[:2000], ts=now_ms)


class DeadLetters:
    """Produces dead letters so that none can stop the loop: the payload is truncated over the size limit,
    a produce that fails (at once or on delivery) is retried once without the payload (length and sha256
    still name the message), and a retry that fails too is counted (``on_lost``) and logged. Their
    offsets are committed all the same: one undeliverable dead letter must not stall a partition."""

    def __init__(self, producer: Producer, topic: str, on_lost: Callable[[RejectReason], None]):
        self.producer, self.topic, self.on_lost = producer, topic, on_lost

    def send(self, m: Message, reason: RejectReason, detail: str, now_ms: int) -> None:
        key = m.key()
        self._produce(dead_letter(m, reason, detail, now_ms), None if key is None else key[:MAX_DEAD_LETTER_KEY_BYTES])

    def _produce(self, letter: DeadLetter, key: bytes | None) -> None:
        try:
            produce_waiting(self.producer, self.topic, letter.model_dump_json().encode(), key,
                            on_delivery=lambda err, _msg: self._delivered(err, letter, key))
        except KafkaException as exc:  # refused before sending (e.g. MSG_SIZE_TOO_LARGE)
            self._delivered(exc.args[0], letter, key)

    def _delivered(self, err: KafkaError | None, letter: DeadLetter, key: bytes | None) -> None:
        if err is None:
            return
        if letter.value_b64:
            log.warning("dead letter for %s:%d@%d not produced (%s): retrying without its payload",
                        letter.source.topic, letter.source.partition, letter.source.offset, err)
            self._produce(letter.model_copy(update={"value_b64": "", "truncated": True}), key)
            return
        log.error("dead letter for %s:%d@%d (%s) lost: %s; its offset is committed all the same",
                  letter.source.topic, letter.source.partition, letter.source.offset, letter.reason.value, err)
        self.on_lost(letter.reason)


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
