"""What the consume loops (processor, log server, alert forwarder, trainer store) share: shutdown, one flag
set by ``stop()`` or SIGTERM/SIGINT, and the verdict on a polled message."""

from __future__ import annotations

import logging
import signal
import threading

from confluent_kafka import KafkaError, KafkaException, Message


def has_data(m: Message, log: logging.Logger) -> bool:
    """Whether a polled message carries data. A fatal client error raises (no retry mends it); the end of a
    partition is passed over quietly; any other error is logged and passed over (librdkafka recovers itself)."""
    err = m.error()
    if err is None:
        return True
    if err.fatal():
        raise KafkaException(err)
    if err.code() != KafkaError._PARTITION_EOF:
        log.warning("consumer error: %s", err)
    return False


class StopOnSignal:
    """Mixin: ``stop()`` asks the loop to finish the batch in hand, deliver, commit, then leave; the loop
    checks ``self._stop``, which the class creates in its ``__init__``."""

    _stop: threading.Event

    def stop(self, *_: object) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
