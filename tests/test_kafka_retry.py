"""Broker calls on assignment ride out passing broker states instead of stopping the processor."""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import KafkaError, KafkaException

from fabwatch.stream.kafka.retry import retry_transient


def failing(errors: list[int], result: str = "ok"):
    """A call that raises ``KafkaException`` with each code of ``errors`` in turn, then returns ``result``."""
    calls = []

    def call() -> str:
        calls.append(1)
        if len(calls) <= len(errors):
            raise KafkaException(KafkaError(errors[len(calls) - 1]))
        return result

    return call, calls


def test_a_moving_leader_or_loading_coordinator_is_retried() -> None:
    call, calls = failing([KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                           KafkaError._TIMED_OUT])
    assert retry_transient(call, "test", first_wait_s=0.01) == "ok" and len(calls) == 4


def test_a_lasting_error_is_raised_at_once() -> None:
    call, calls = failing([KafkaError.TOPIC_AUTHORIZATION_FAILED])
    with pytest.raises(KafkaException):
        retry_transient(call, "test", first_wait_s=0.01)
    assert len(calls) == 1


def test_a_transient_error_that_outlasts_the_limit_is_raised() -> None:
    call, calls = failing([KafkaError.NOT_LEADER_FOR_PARTITION] * 100)
    with pytest.raises(KafkaException):
        retry_transient(call, "test", within_s=0.1, first_wait_s=0.02)
    assert 2 <= len(calls) < 10


def test_an_error_that_asks_to_abort_the_transaction_is_raised_at_once_even_if_retriable() -> None:
    calls = []

    def call() -> None:
        calls.append(1)
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, retriable=True, txn_requires_abort=True))

    with pytest.raises(KafkaException):
        retry_transient(call, "test", first_wait_s=0.01)
    assert len(calls) == 1


def test_a_stop_request_ends_the_retries() -> None:
    stop = threading.Event()
    call, calls = failing([KafkaError.COORDINATOR_LOAD_IN_PROGRESS] * 100)
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    with pytest.raises(KafkaException):
        retry_transient(call, "test", within_s=30, first_wait_s=0.05, max_wait_s=0.05, stop=stop)
    assert time.monotonic() - started < 5 and len(calls) < 20
