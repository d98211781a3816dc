"""The exactly-once producer's lifecycle: every transactional call has a deadline, and a producer that cannot
finish a transaction is replaced by a new one with the same ``transactional.id``.

Why: after a broker restart librdkafka's transactional producer can wedge for good (2.16:
``send_offsets_to_transaction`` blocking past its own timeout, confluentinc/librdkafka#5456, fix pending in #5457;
or AddOffsetsToTxn never leaving the queue for the restarted coordinator, so every call times out). Retrying on the
same producer does not mend that. A new producer's ``init_transactions`` bumps the id's epoch, which fences the old
one and makes the coordinator abort its open transaction (as Kafka Streams does with a producer it cannot trust),
so the caller rewinds to the committed offsets and redoes the batch on the new producer.

A call that does not return runs in its own daemon thread, which the loop stops waiting for at the deadline: that
thread and its producer are abandoned (the producer is fenced, so nothing it still sends can commit) and the
producer is closed by a daemon thread once the stuck call returns, if it ever does.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, TypeVar

from confluent_kafka import KafkaError, KafkaException, Producer

from fabwatch.stream.kafka.retry import retry_transient

log = logging.getLogger("fabwatch.transactions")
T = TypeVar("T")

STUCK_GRACE_S = 10.0  # past the transaction timeout, the most a call is waited for before its producer is given up
MAX_REPLACEMENTS = 3  # new producers tried in a row (each must init_transactions) before the error propagates
# the id is someone else's now (another process with this instance's transactional.id): taking it back would fence
# that one in turn, so the error propagates as before
FENCED = frozenset({KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH})


class TransactionStuck(RuntimeError):
    """A transactional call that did not return within the transaction timeout (and the grace after it);
    ``worker`` is the thread still inside it."""

    def __init__(self, message: str, worker: threading.Thread):
        super().__init__(message)
        self.worker = worker


class ProducerBroken(RuntimeError):
    """The transactional producer was replaced: the transaction in hand is gone, rewind and redo the batch."""


class TransactionalProducer:
    """Owns the processor's transactional producer (``producer``: use it for ``produce`` and ``poll`` inside a
    transaction; it changes when the producer is replaced, so never keep it across batches).

    ``call`` makes a transactional call with a deadline of ``timeout_s``: retried while it fails transiently,
    handed to the caller as ``KafkaException`` when it asks to abort (``txn_requires_abort``) or the producer is
    fenced (another process holds the id: taking it back would fence that one in turn), and otherwise, when it
    fails fatally, keeps timing out, or does not return at all, the producer is replaced and ``ProducerBroken``
    raised. ``on_replaced(new_producer)`` runs once per replacement, when the new producer is ready."""

    def __init__(self, conf: dict[str, Any], timeout_s: float, stop: threading.Event,
                 on_replaced: Callable[[Producer], None]):
        self._conf, self.timeout_s, self._stop, self._on_replaced = conf, timeout_s, stop, on_replaced
        self.producer = Producer(conf)

    def init(self) -> None:
        """``init_transactions`` of the first producer, before the first transaction."""
        self._run(lambda p, t: p.init_transactions(t), "initialising transactions", self.producer)

    def begin(self) -> None:
        self._guarded(lambda p, _t: p.begin_transaction(), "beginning the transaction", pass_abortable=True,
                      in_thread=False)

    def call(self, fn: Callable[[Producer, float], T], what: str) -> T:
        """``fn(producer, timeout_s)``: a transactional call, which gets the time left to its deadline."""
        return self._guarded(fn, what, pass_abortable=True)

    def abort(self) -> None:
        """Abort the transaction in hand; a producer that cannot is replaced (which aborts it as well)."""
        self._guarded(lambda p, t: p.abort_transaction(t), "aborting the transaction", pass_abortable=False)

    def _guarded(self, fn: Callable[[Producer, float], T], what: str, pass_abortable: bool,
                 in_thread: bool = True) -> T:
        try:
            if not in_thread:  # a call that only changes local state: it cannot block
                return fn(self.producer, self.timeout_s)
            return self._run(fn, what, self.producer)
        except (KafkaException, TransactionStuck) as exc:
            err = exc.args[0] if isinstance(exc, KafkaException) else None
            if self._stop.is_set() or (err is not None and (err.code() in FENCED
                                                            or (pass_abortable and err.txn_requires_abort()))):
                raise  # a stop request ends the retries: the batch is left for the restart, as after a crash
            self._replace(f"{what} failed: {err}" if err is not None else str(exc),
                          exc.worker if isinstance(exc, TransactionStuck) else None)
        raise AssertionError("unreachable")  # _replace raises

    def _run(self, fn: Callable[[Producer, float], T], what: str, producer: Producer) -> T:
        """``fn`` retried through transient errors until the deadline, in a daemon thread the caller stops waiting
        for ``STUCK_GRACE_S`` after the deadline (``TransactionStuck``); the thread is then left to its call."""
        deadline = time.monotonic() + self.timeout_s
        outcome: dict[str, Any] = {}

        def attempt() -> T:
            return fn(producer, max(1.0, deadline - time.monotonic()))

        def work() -> None:
            try:
                outcome["value"] = retry_transient(attempt, what, within_s=self.timeout_s, first_wait_s=0.5,
                                                   max_wait_s=0.5, stop=self._stop)
            except BaseException as exc:  # handed to the caller's thread
                outcome["error"] = exc

        worker = threading.Thread(target=work, name=f"txn: {what}", daemon=True)
        worker.start()
        worker.join(self.timeout_s + STUCK_GRACE_S)
        if worker.is_alive():
            raise TransactionStuck(f"{what} did not return within {self.timeout_s + STUCK_GRACE_S:.0f} s", worker)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def _replace(self, reason: str, busy: threading.Thread | None) -> None:
        """A new producer with the same ``transactional.id`` in place of the current one (``busy``: the thread
        still inside a call on it); its ``init_transactions`` fences the old producer and aborts its open
        transaction. Raises ``ProducerBroken`` once done."""
        log.error("transactional producer replaced: %s; a new one fences it and the batch is redone from the "
                  "committed offsets", reason)
        self._retire(self.producer, busy)
        for attempt in range(1, MAX_REPLACEMENTS + 1):
            self.producer = Producer(self._conf)
            try:
                self._run(lambda p, t: p.init_transactions(t), "initialising transactions", self.producer)
                self._on_replaced(self.producer)
                raise ProducerBroken(reason)
            except (KafkaException, TransactionStuck) as exc:
                fenced = isinstance(exc, KafkaException) and exc.args[0].code() in FENCED
                if attempt == MAX_REPLACEMENTS or fenced:
                    raise
                log.warning("new transactional producer %d of %d could not initialise (%s): trying another",
                            attempt, MAX_REPLACEMENTS, exc)
                self._retire(self.producer, exc.worker if isinstance(exc, TransactionStuck) else None)

    @staticmethod
    def _retire(producer: Producer, busy: threading.Thread | None) -> None:
        """Close a replaced producer off the loop's thread: after the call still running in it (``busy``) returns,
        if ever; ``close`` itself may wait on a producer that no broker answers."""
        def close() -> None:
            if busy is not None:
                busy.join()
            try:
                producer.close()
            except KafkaException as exc:
                log.info("replaced transactional producer closed with: %s", exc)

        threading.Thread(target=close, name="txn: retire producer", daemon=True).start()
