"""Options and output helpers shared by every area's commands (one definition, one behaviour)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from fabwatch.export.errors import UsageError
from fabwatch.stream.kafka.config import Settings

JsonFlag = Annotated[bool, typer.Option("--json", help="machine-readable output")]
RegistryOpt = Annotated[Path, typer.Option("--registry", help="model registry directory")]
BootstrapOpt = Annotated[Optional[str], typer.Option("--bootstrap", help="Kafka bootstrap servers "
                                                     "(default: $KAFKA_BOOTSTRAP_SERVERS, else the local broker)")]
MetricsHostOpt = Annotated[str, typer.Option("--metrics-host", help="address the metrics server binds "
                                             "(127.0.0.1: this host only)")]
# the serving loops' (`serve`, `logs serve`) probes
MetricsPortOpt = Annotated[Optional[int], typer.Option("--metrics-port", help="Prometheus /metrics, /ready and "
                                                       "/healthz on this port")]
LivenessTimeoutOpt = Annotated[Optional[float], typer.Option(
    "--liveness-timeout-s", min=1, help="/healthz fails after this long without a turn of the consume loop or the "
    "model watcher (default: twice max.poll.interval.ms, at least 60)")]
# how `train`, `evaluate` and `replay` map a file's columns (fabwatch.stream.offline.files.ColumnMap)
TsColOpt = Annotated[Optional[str], typer.Option("--ts-col", help="timestamp column: ISO-8601, epoch s or ms "
                                                 "(inferred: ts, timestamp, time, datetime, date)")]
EntityColOpt = Annotated[Optional[str], typer.Option("--entity-col", help="entity column (inferred: entity, "
                                                     "device, tool, ...; none: the file is one entity)")]
EntityOpt = Annotated[Optional[str], typer.Option("--entity", help="name of the one entity of a file without an "
                                                  "entity column (default: all)")]
FeaturesOpt = Annotated[Optional[str], typer.Option("--features", help="comma-separated feature columns "
                                                    "(inferred: numeric columns not named like entity/ts/label)")]
# `serve` and `evaluate` must agree on it for their windows, and so their alerts, to agree
GraceOpt = Annotated[int, typer.Option("--grace-ms", min=0, help="a reading up to this much older than its "
                                       "entity's newest is put in order in the window, not dead-lettered as late "
                                       "(0: every out-of-order reading is late)")]
LabelColOpt = Annotated[Optional[str], typer.Option("--label-col", help="0/1 label column (inferred: label, "
                                                    "is_anomaly, anomaly)")]


def settings_for(bootstrap: str | None = None) -> Settings:
    """Settings from the environment, with ``--bootstrap`` taking precedence."""
    settings = Settings()
    if bootstrap:
        settings.bootstrap = bootstrap
    return settings


def column_list(text: str | None) -> list[str] | None:
    """``--features a,b`` -> ["a", "b"]; None when not given."""
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def emit(data: Any, as_json: bool, human: str) -> None:
    """Print the JSON form with ``--json``, else the human sentence."""
    typer.echo(json.dumps(data, indent=2, default=str) if as_json else human)


def dataset_dir(name: str, given: Path | None) -> Path:
    """A benchmark data set's folder: ``--data-dir``, else ``$FABWATCH_DATASETS/<name>``, else
    ``../shared/datasets/<name>`` beside the current directory (a checkout's neighbour). Never a path inside
    the installed package, so an installed wheel benchmarks the same data as a checkout."""
    if given is None:
        root = os.environ.get("FABWATCH_DATASETS")
        given = (Path(root) if root else Path("..") / "shared" / "datasets") / name
    if not given.is_dir():
        raise UsageError(f"no {name} data set at {given}: pass --data-dir or set FABWATCH_DATASETS")
    return given


def require_extra(extra: str, *modules: str) -> None:
    """Refuse in one line, naming the extra to install, when a command's optional libraries are missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"this command needs {', '.join(missing)}: pip install 'fabwatch[{extra}]'")
