"""Run one sidecar retrain whose training is held open until the test lets it finish.

Test helper for the trainer's chaos tests (run as a script, never imported by the package):
``python tests/held_trainer.py REGISTRY STORE CONTROL_DIR [--no-ingest]``. Kafka settings come from the
``FABWATCH_*`` environment (``stream_helpers.serve_env``). The trainer ingests the sensor topic, then calls
``retrain_once``; its training (TensorFlow, minutes to hours) is replaced by a copy of the serving version
committed as the candidate, made only after ``CONTROL_DIR/release`` exists, so the test can act while the
retrain runs. ``CONTROL_DIR/training-<pid>`` marks that this process got as far as training.
``HELD_TRAINER_HOURS_LATER=N`` runs this trainer's clock N hours ahead (a retrain that has lasted N hours).
The decision record is printed as JSON on stdout.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from fabwatch.models.sidecar.trainer import Trainer, TrainerOptions
from fabwatch.stream.kafka.config import Settings


class HeldTrainer(Trainer):
    def __init__(self, settings: Settings, options: TrainerOptions, control: Path):
        super().__init__(settings, options)
        self.control = control

    def train_candidate(self, overrides: dict) -> tuple[str, float]:
        (self.control / f"training-{os.getpid()}").touch()
        while not (self.control / "release").exists():
            time.sleep(0.1)
        serving_dir, serving = self.registry.resolve()
        staging = self.registry.stage()
        shutil.copytree(serving_dir, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json"))
        return self.registry.commit(staging, serving.model_copy()), 0.0


def main(registry: Path, store: Path, control: Path, ingest: bool) -> None:
    hours_later = float(os.environ.get("HELD_TRAINER_HOURS_LATER", "0"))
    if hours_later:
        wall_clock = time.time
        time.time = lambda: wall_clock() + hours_later * 3600
    trainer = HeldTrainer(Settings(), TrainerOptions(registry=registry, store=store, retention_days=None), control)
    try:
        if ingest:
            trainer.ingest()
        record = trainer.retrain_once()
    finally:
        trainer.close()
    print(json.dumps(record, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), "--no-ingest" not in sys.argv[4:])
