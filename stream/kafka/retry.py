"""Broker calls retried through the broker's passing states: a leader moving, a coordinator loading, the
broker restarting, a request timing out. Left to raise, such an answer (to a committed-offsets read inside
the assignment callback, or to a transactional call) would stop the processor over nothing lasting."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, TypeVar

from confluent_kafka import KafkaError, KafkaException

log = logging.getLogger("fabwatch.kafka")
T = TypeVar("T")

TRANSIENT_CODES = frozenset({
    KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.REQUEST_TIMED_OUT,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,  # a topic created a moment ago, not yet known to every listener
    KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._WAIT_COORD, KafkaError._ALL_BROKERS_DOWN,
})


def is_transient(err: KafkaError) -> bool:
    """Worth the same call again. Never a fatal error, nor one that asks to abort the transaction: the caller
    must handle those."""
    if err.fatal() or err.txn_requires_abort():
        return False
    return err.retriable() or err.code() in TRANSIENT_CODES


def retry_transient(call: Callable[[], T], what: str, within_s: float = 60.0, first_wait_s: float = 0.2,
                    max_wait_s: float = 5.0, stop: threading.Event | None = None) -> T:
    """``call()``, made again after doubling waits (``first_wait_s`` up to ``max_wait_s``) while it fails with a
    transient broker error, ``within_s`` has not passed and ``stop`` is not set; any other error, or one that
    outlasts those, is raised."""
    deadline, wait = time.monotonic() + within_s, first_wait_s
    while True:
        try:
            return call()
        except KafkaException as exc:
            err = exc.args[0]
            if not isinstance(err, KafkaError) or not is_transient(err) or time.monotonic() + wait > deadline \
                    or (stop is not None and stop.is_set()):
                raise
            log.warning("%s: %s; retrying in %.1f s", what, err, wait)
            if stop is not None:
                stop.wait(wait)
            else:
                time.sleep(wait)
            wait = min(wait * 2, max_wait_s)
