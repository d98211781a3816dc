"""Errors shared by all fabwatch packages."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


class UsageError(Exception):
    """Bad usage or bad input: the CLI prints this one-line message and exits with code 2."""


def read_json_model(model: type[M], path: Path, what: str) -> M:
    """A pydantic model from a JSON file; a missing or invalid file is a ``UsageError`` naming ``what``."""
    try:
        return model.model_validate_json(Path(path).read_bytes())
    except FileNotFoundError:
        raise UsageError(f"{what} {path} not found") from None
    except ValueError as exc:
        raise UsageError(f"{path}: not a {what} ({str(exc)[:200]})") from None
