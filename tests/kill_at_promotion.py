"""Run the fabwatch CLI and SIGKILL it at one moment of writing or promoting a registry version.

Test helper for the trainer's crash-safety test (run as a script, never imported by the package):
``python tests/kill_at_promotion.py POINT fabwatch-args...`` where POINT is

- ``commit``: the candidate's version directory has just been renamed into place; ``current`` untouched;
- ``switch``: ``current`` has just been switched to the candidate; the promotion history, the decision
  record and the ModelEvent are not written yet.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from fabwatch.export import registry


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_after_commit() -> None:
    commit = registry.Registry.commit

    def commit_then_die(self: registry.Registry, staging: Path, manifest: registry.Manifest) -> str:
        commit(self, staging, manifest)
        _die()
        raise AssertionError("unreachable")

    registry.Registry.commit = commit_then_die


def _kill_after_switch() -> None:
    write = registry.atomic_write_text

    def write_then_die(path: Path, text: str) -> None:
        write(path, text)
        if path.name == "current":
            _die()

    registry.atomic_write_text = write_then_die


if __name__ == "__main__":
    point, args = sys.argv[1], sys.argv[2:]
    {"commit": _kill_after_commit, "switch": _kill_after_switch}[point]()
    from fabwatch.stream.cli.main import main

    sys.argv = ["fabwatch", *args]
    main()
