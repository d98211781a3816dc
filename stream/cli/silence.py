"""``fabwatch silence add|list|remove``: maintenance silences on the compacted silence topic; what they do is
in ``fabwatch.stream.silences``."""

from __future__ import annotations

import getpass
import time
import uuid
from datetime import datetime, timezone
from typing import Annotated, Optional

import typer

from fabwatch.export.errors import UsageError
from fabwatch.stream.cli.options import BootstrapOpt, JsonFlag, emit, settings_for
from fabwatch.stream.kafka.config import Settings


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _login() -> str:
    """The login name, or "" where there is none (a container without USER and with no passwd entry)."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return ""


def _settings(bootstrap: str | None) -> Settings:
    """Settings, with the silence topic created: a producer alone could have the broker auto-create it as a
    plain (deleting, not compacted) topic."""
    from fabwatch.stream.kafka.topics import ensure_topics

    settings = settings_for(bootstrap)
    ensure_topics(settings, [settings.topics.silences])
    return settings


def silence_add(
    until: Annotated[str, typer.Option("--until", help="end: a duration from now (30m, 2h, 1d), epoch ms or "
                                       "ISO-8601 (event time)")],
    reason: Annotated[str, typer.Option("--reason", help="why (shown by `silence list`)")],
    entity: Annotated[Optional[str], typer.Option("--entity", help="silence this entity")] = None,
    match: Annotated[Optional[str], typer.Option("--match", help="silence every entity this glob matches "
                                                 "(OHT-0*, case-sensitive)")] = None,
    starts: Annotated[Optional[str], typer.Option("--starts", help="start, as --until (default: now); a past "
                                                  "start silences replayed history too")] = None,
    silence_id: Annotated[Optional[str], typer.Option("--id", help="its id (default: a random one); an existing id "
                                                      "is replaced")] = None,
    created_by: Annotated[Optional[str], typer.Option("--created-by", help="who (default: the login name)")] = None,
    bootstrap: BootstrapOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Silence an entity's alerts, or those of every entity matching a glob, for a span of event time."""
    from pydantic import ValidationError

    from fabwatch.stream.schemas import Silence
    from fabwatch.stream.silences import parse_time_ms, publish

    if (entity is None) == (match is None):
        raise UsageError("give one of --entity E or --match PATTERN")
    now_ms = int(time.time() * 1000)
    try:
        silence = Silence(id=silence_id or uuid.uuid4().hex[:12], entity=entity, match=match,
                          starts=parse_time_ms(starts, now_ms) if starts else now_ms,
                          until=parse_time_ms(until, now_ms), reason=reason,
                          created_by=created_by if created_by is not None else _login(), created_at=now_ms)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise UsageError(f"{'.'.join(str(p) for p in first['loc']) or 'silence'}: {first['msg']}") from None
    publish(_settings(bootstrap), silence.id, silence)
    emit(silence.model_dump(), as_json, f"silence {silence.id} added: {entity or match} from "
                                        f"{_iso(silence.starts)} until {_iso(silence.until)}")


def silence_list(
    show_all: Annotated[bool, typer.Option("--all", help="also the expired ones")] = False,
    bootstrap: BootstrapOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """The silences on the topic, pending and active ones (and expired with --all), by the wall clock."""
    from fabwatch.stream.silences import read_silences, status

    now_ms = int(time.time() * 1000)
    rows = [{**s.model_dump(), "status": status(s, now_ms)} for s in read_silences(_settings(bootstrap))]
    rows = [r for r in rows if show_all or r["status"] != "expired"]
    lines = [f"{r['id']:12} {r['status']:8} {r['entity'] or r['match']:16} {_iso(r['starts'])} -> "
             f"{_iso(r['until'])}  {r['created_by']}: {r['reason']}" for r in rows]
    emit(rows, as_json, "\n".join(lines) or "no silences")


def silence_remove(
    silence_id: Annotated[str, typer.Argument(help="the silence's id (`silence list`)")],
    bootstrap: BootstrapOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """End a silence now: alerts opened from here on flow again (a tombstone on the compacted topic)."""
    from fabwatch.stream.silences import publish, read_silences

    settings = _settings(bootstrap)
    if read_silences(settings).get(silence_id) is None:
        raise UsageError(f"no silence {silence_id!r} (see `fabwatch silence list --all`)")
    publish(settings, silence_id, None)
    emit({"removed": silence_id}, as_json, f"silence {silence_id} removed")


def register(app: typer.Typer, _bench_app: typer.Typer) -> None:
    """Add ``silence`` to ``app``."""
    silence_app = typer.Typer(help="Maintenance silences: alerts of silenced entities are not published.",
                              no_args_is_help=True)
    app.add_typer(silence_app, name="silence")
    silence_app.command("add")(silence_add)
    silence_app.command("list")(silence_list)
    silence_app.command("remove")(silence_remove)
