"""Commands of this area, registered on the root ``fabwatch`` app by ``fabwatch.stream.cli.main``:
``fabwatch serve`` and ``fabwatch bench stream``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from fabwatch.export.errors import UsageError
from fabwatch.stream.cli.options import (BootstrapOpt, GraceOpt, JsonFlag, LivenessTimeoutOpt, MetricsHostOpt,
                                         MetricsPortOpt, settings_for)
from fabwatch.stream.metrics import DEFAULT_METRICS_HOST
from fabwatch.stream.windows import DEFAULT_GRACE_MS

def serve(
    registry: Annotated[Path, typer.Option("--registry", help="model registry directory (serves its `current`)")],
    bootstrap: BootstrapOpt = None,
    exactly_once: Annotated[bool, typer.Option("--exactly-once", help="transactional outputs + offsets "
                                               "(downstream consumers read_committed)")] = False,
    emit_scores: Annotated[bool, typer.Option("--emit-scores", help="also produce every window score")] = False,
    stride: Annotated[int, typer.Option(min=1, help="score ~1 reading in K per key")] = 1,
    grace_ms: GraceOpt = DEFAULT_GRACE_MS,
    metrics_port: MetricsPortOpt = None,
    metrics_host: MetricsHostOpt = DEFAULT_METRICS_HOST,
    liveness_timeout_s: LivenessTimeoutOpt = None,
    group: Annotated[str, typer.Option(help="consumer group")] = "fabwatch-processor",
    instance_id: Annotated[Optional[str], typer.Option(help="unique per instance (transactional id); given, it "
                                                       "makes the instance a static group member that gets its "
                                                       "partitions back on restart; default: the host name "
                                                       "(dynamic member)")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="readings per poll and windows per model call")] = 512,
    max_wait_ms: Annotated[int, typer.Option(min=0, help="longest wait to fill a poll batch")] = 20,
    min_consecutive: Annotated[int, typer.Option(min=1, help="windows above threshold before opening")] = 1,
    cooldown_ms: Annotated[int, typer.Option(min=0, help="event-time quiet period after a close")] = 0,
    max_keys: Annotated[int, typer.Option(min=1, help="cap on live keys (least recently seen evicted)")] = 100_000,
    key_ttl_s: Annotated[float, typer.Option(min=0, help="evict keys idle this long (0: never)")] = 6 * 3600.0,
    rebuild_chunk: Annotated[int, typer.Option(min=1, help="readings re-read per step when rebuilding windows "
                                               "after an assignment")] = 20_000,
    rebuild_max_messages: Annotated[int, typer.Option(min=1, help="most readings re-read per partition to rebuild "
                                                      "windows")] = 2_000_000,
    rebuild_timeout_s: Annotated[float, typer.Option(min=0, help="longest window rebuild per partition; keys "
                                                     "still short are logged")] = 30.0,
    silenced_alerts: Annotated[str, typer.Option("--silenced-alerts", help="alerts a maintenance silence covers: "
                                                 "drop (default) or mark (published with silence_id set)")] = "drop",
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Score the sensor stream with the registry's current model and produce alerts."""
    from fabwatch.stream.policy import PolicyConfig
    from fabwatch.stream.processor import Processor, ProcessorConfig

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not registry.is_dir():
        raise UsageError(f"no model registry at {registry}")
    if silenced_alerts not in ("drop", "mark"):
        raise UsageError(f"--silenced-alerts takes drop or mark, not {silenced_alerts!r}")
    config = ProcessorConfig(registry=registry, group_id=group, exactly_once=exactly_once, emit_scores=emit_scores,
                             stride=stride, grace_ms=grace_ms, max_batch=max_batch, max_wait_ms=max_wait_ms,
                             max_keys=max_keys, key_ttl_s=key_ttl_s or None, metrics_port=metrics_port,
                             metrics_host=metrics_host, liveness_timeout_s=liveness_timeout_s,
                             rebuild_chunk=rebuild_chunk, rebuild_max_messages=rebuild_max_messages,
                             rebuild_timeout_s=rebuild_timeout_s, instance_id=instance_id or None,
                             silenced_alerts=silenced_alerts,  # type: ignore[arg-type]
                             policy=PolicyConfig(min_consecutive=min_consecutive, cooldown_ms=cooldown_ms))
    processor = Processor(settings_for(bootstrap), config)
    processor.install_signal_handlers()
    processor.run()


def bench_stream(
    bootstrap: BootstrapOpt = None,
    messages: Annotated[int, typer.Option(help="readings for the throughput runs")] = 200_000,
    entities: Annotated[int, typer.Option(help="distinct keys")] = 200,
    latency_seconds: Annotated[float, typer.Option(help="duration of the 1,000 readings/s latency run")] = 15.0,
    rounds: Annotated[int, typer.Option(min=1, help="alternated (a)/(b) rounds; the best of each is compared")] = 5,
    as_json: JsonFlag = False,
) -> None:
    """Processor throughput vs raw consume, full-size ensemble at stride 1/10, ingest-to-alert latency."""
    from fabwatch.stream.bench.stream import run_bench

    result = run_bench(settings_for(bootstrap), messages=messages, entities=entities, latency_seconds=latency_seconds,
                       rounds=rounds, log=lambda s: typer.echo(s, err=True))
    typer.echo(json.dumps(result, indent=2) if as_json else "\n".join(f"{k}: {v}" for k, v in result.items()))


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add this area's commands to ``app`` and its benchmarks to ``bench_app``."""
    app.command("serve")(serve)
    bench_app.command("stream")(bench_stream)
