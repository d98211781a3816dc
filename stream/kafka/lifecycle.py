"""Shutdown for the consume loops (processor, log server): one flag, set by ``stop()`` or SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import threading


class StopOnSignal:
    """Mixin: ``stop()`` asks the loop to finish the batch in hand, deliver, commit, then leave; the loop
    checks ``self._stop``, which the class creates in its ``__init__``."""

    _stop: threading.Event

    def stop(self, *_: object) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
