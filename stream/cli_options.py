"""Options and output helpers shared by every area's commands (one definition, one behaviour)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from stream.config import Settings

JsonFlag = Annotated[bool, typer.Option("--json", help="machine-readable output")]
RegistryOpt = Annotated[Path, typer.Option("--registry", help="model registry directory")]
BootstrapOpt = Annotated[Optional[str], typer.Option("--bootstrap", help="Kafka bootstrap servers "
                                                     "(default: $KAFKA_BOOTSTRAP_SERVERS, else the local broker)")]


def settings_for(bootstrap: str | None = None) -> Settings:
    """Settings from the environment, with ``--bootstrap`` taking precedence."""
    settings = Settings()
    if bootstrap:
        settings.bootstrap = bootstrap
    return settings


def emit(data: Any, as_json: bool, human: str) -> None:
    """Print the JSON form with ``--json``, else the human sentence."""
    typer.echo(json.dumps(data, indent=2, default=str) if as_json else human)
