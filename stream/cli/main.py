"""The ``fabwatch`` command line. Each area registers its commands here; heavy imports (TensorFlow,
onnxruntime) happen inside the commands so ``fabwatch --help`` stays fast and serving needs no TF."""

from __future__ import annotations

import json
import logging
import os
import sys
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Annotated, Optional

import pydantic
import typer

from fabwatch.export.errors import UsageError
from fabwatch.stream.cli.options import (BootstrapOpt, EntityColOpt, EntityOpt, FeaturesOpt, GraceOpt, JsonFlag,
                                         LabelColOpt, MetricsHostOpt, TsColOpt, column_list, emit, require_extra,
                                         settings_for)
from fabwatch.stream.kafka.config import Settings
from fabwatch.stream.metrics import DEFAULT_METRICS_HOST
from fabwatch.stream.windows import DEFAULT_GRACE_MS

app = typer.Typer(help="fabwatch: streaming anomaly and delay detection on Kafka.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
broker_app = typer.Typer(help="Local single-node Apache Kafka (KRaft), data under .fabwatch/.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print numbers with the machine and the command.", no_args_is_help=True)
app.add_typer(broker_app, name="broker")
app.add_typer(bench_app, name="bench")

ENV_PREFIX = "FABWATCH"  # every option also reads FABWATCH_<COMMAND>_<OPTION> (click's auto_envvar_prefix)
CHATTY_LOGGERS = ("tf2onnx", "absl", "h5py", "matplotlib")  # start-up and per-node chatter, not results


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"fabwatch {installed_version('fabwatch')}")
        raise typer.Exit()


def quiet_libraries(verbose: bool) -> None:
    """Keep TensorFlow's C++ start-up log (cuInit, oneDNN notices) and tf2onnx's per-node log off the screen
    unless ``--verbose``; set before TensorFlow loads (it is imported lazily, inside the commands, and
    ``fabwatch.models.tf`` reads ``FABWATCH_VERBOSE``)."""
    if verbose:
        os.environ["FABWATCH_VERBOSE"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "3")
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


@app.callback()
def root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show library start-up and debug logs")] = False,
         _version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """fabwatch: streaming anomaly and delay detection on Kafka."""
    quiet_libraries(verbose)

# ---- broker ---------------------------------------------------------------------------------------

@broker_app.command("up")
def broker_up(as_json: JsonFlag = False) -> None:
    """Start the local broker (fetching its jars once); a no-op when it already runs."""
    from fabwatch.stream.kafka.broker import LocalBroker

    broker = LocalBroker(Settings().home)
    if not as_json and broker.running_state() is None:
        typer.echo("starting the local Kafka broker (the first run fetches its jars with Maven)...", err=True)
    state, started = broker.up()
    emit({"bootstrap": state.bootstrap, "pid": state.pid, "started": started}, as_json,
         f"Kafka broker {'started' if started else 'already running'} at {state.bootstrap} (pid {state.pid})")


@broker_app.command("fetch")
def broker_fetch() -> None:
    """Fetch the broker's jars with Maven into the cache (done by `up` when needed)."""
    from fabwatch.stream.kafka.broker import LocalBroker

    typer.echo(f"Kafka broker jars in {LocalBroker(Settings().home).ensure_jars()}")


@broker_app.command("down")
def broker_down(as_json: JsonFlag = False) -> None:
    """Stop the local broker (SIGTERM, then SIGKILL after a timeout)."""
    from fabwatch.stream.kafka.broker import LocalBroker

    stopped = LocalBroker(Settings().home).down()
    emit({"stopped": stopped}, as_json, "Kafka broker stopped" if stopped else "no local Kafka broker was running")


@broker_app.command("status")
def broker_status(as_json: JsonFlag = False) -> None:
    """Bootstrap address and health of the local broker; exit 1 when none is running."""
    from fabwatch.stream.kafka.broker import LocalBroker

    status = LocalBroker(Settings().home).status()
    human = (f"running at {status['bootstrap']} (pid {status['pid']}), healthy={status['healthy']}"
             if status["running"] else "not running")
    emit(status, as_json, human)
    if not status["healthy"]:
        raise typer.Exit(1)


# ---- topics and schemas ---------------------------------------------------------------------------

@app.command("topics")
def topics(bootstrap: BootstrapOpt = None,
           partitions: Annotated[Optional[int], typer.Option(help="partitions for new topics")] = None,
           as_json: JsonFlag = False) -> None:
    """Create fabwatch's topics (idempotent)."""
    from fabwatch.stream.kafka.topics import ensure_topics

    result = ensure_topics(settings_for(bootstrap), partitions=partitions)
    emit(result, as_json, "\n".join(f"{t}: {s}" for t, s in result.items()))


@app.command("schemas")
def schemas(out: Annotated[Path, typer.Option("--out", help="directory for the JSON Schemas")] = Path("deploy/schemas")) -> None:
    """Write the JSON Schema of every message to OUT."""
    from fabwatch.stream.schemas import MESSAGE_MODELS

    out.mkdir(parents=True, exist_ok=True)
    for name, model in MESSAGE_MODELS.items():
        (out / f"{name}.schema.json").write_text(json.dumps(model.model_json_schema(), indent=2) + "\n")
    typer.echo(f"wrote {len(MESSAGE_MODELS)} schemas to {out}")


# ---- replay ---------------------------------------------------------------------------------------

@app.command("replay")
def replay_cmd(
    file: Annotated[Path, typer.Argument(help="CSV, Parquet or JSONL file of readings, or a raw HDFS log")],
    topic: Annotated[Optional[str], typer.Option(help="target topic (default: the sensors topic; "
                                                 "the logkeys topic for --format hdfs-log)")] = None,
    speed: Annotated[Optional[float], typer.Option(help="X times the recorded pace, by timestamps")] = None,
    max_speed: Annotated[bool, typer.Option("--max-speed", help="as fast as the broker takes (default)")] = False,
    limit: Annotated[Optional[int], typer.Option(help="stop after N messages")] = None,
    loop: Annotated[bool, typer.Option("--loop", help="repeat the file, timestamps shifted past its end")] = False,
    fmt: Annotated[Optional[str], typer.Option("--format", help="csv | parquet | jsonl (default: by extension) | "
                                               "hdfs-log (raw HDFS lines -> one log key per line and block)")] = None,
    templates: Annotated[Optional[Path], typer.Option("--templates", help="hdfs-log: EventId,EventTemplate CSV "
                                                      "(loghub HDFS_templates.csv format); Drain when absent")] = None,
    registry: Annotated[Optional[Path], typer.Option("--registry", help="hdfs-log: key lines with the Drain "
                                                     "templates stored with this registry's current logkeys model, "
                                                     "as it was trained (default: learn them from FILE)")] = None,
    entity_col: EntityColOpt = None,
    entity: EntityOpt = None,
    ts_col: TsColOpt = None,
    features: FeaturesOpt = None,
    label_col: LabelColOpt = None,
    strict: Annotated[bool, typer.Option("--strict", help="stop at the first bad row (exit 2)")] = False,
    bootstrap: BootstrapOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Replay a historical file into Kafka: readings keyed by entity, or log keys keyed by session."""
    from fabwatch.stream.logs.parse import DrainState
    from fabwatch.stream.offline.replay import load_records, log_messages, reading_messages, replay

    if speed is not None and max_speed:
        raise UsageError("--speed and --max-speed exclude each other")
    settings = settings_for(bootstrap)
    if fmt == "hdfs-log":
        if entity_col or entity or ts_col or features or label_col or strict:
            raise UsageError("--entity-col, --entity, --ts-col, --features, --label-col and --strict are for tables, "
                             "not --format hdfs-log")
        topic = topic or settings.topics.logkeys
        messages = log_messages(file, templates, DrainState.from_registry(registry) if registry else None)
    else:
        if templates is not None or registry is not None:
            raise UsageError("--templates and --registry are for --format hdfs-log")
        topic = topic or settings.topics.sensors
        records = load_records(file, fmt, entity_col=entity_col, ts_col=ts_col, features=column_list(features),
                               label_col=label_col, entity=entity, strict=strict)
        for row, reason, detail in records.rejected[:10]:
            typer.echo(f"skipping row {row + 1}: {reason}: {detail}", err=True)
        if len(records.rejected) > 10:
            typer.echo(f"... and {len(records.rejected) - 10} more bad rows", err=True)
        messages = reading_messages(records, len(records.ts) + len(records.rejected))
    summary = replay(messages, settings, topic, speed=speed, limit=limit, loop=loop, progress=not as_json)
    data = summary.as_dict()
    emit(data, as_json, f"sent {data['sent']} of {data['rows_in_file']} rows to {topic} in {data['seconds']} s "
                        f"({data['msgs_per_s']} msgs/s); rejected {data['rejected'] or 'none'}")
    if summary.delivery_errors:
        raise typer.Exit(1)


# ---- offline evaluation ---------------------------------------------------------------------------

@app.command("evaluate")
def evaluate_cmd(
    registry: Annotated[Path, typer.Option("--registry", help="model registry (its `current` version)")],
    data: Annotated[Path, typer.Option("--data", help="CSV, Parquet or JSONL recording")],
    label_col: LabelColOpt = None,
    predictions: Annotated[Optional[Path], typer.Option("--predictions", help="row-aligned CSV of score and pred")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="PNG: features, score, threshold, labels")] = None,
    plot_entity: Annotated[Optional[str], typer.Option("--plot-entity", help="entity to plot (default: most labelled)")] = None,
    skip_rows: Annotated[int, typer.Option("--skip-rows", min=0, help="exclude each entity's first N rows (training prefix)")] = 0,
    stride: Annotated[int, typer.Option(min=1, help="as `serve --stride`")] = 1,
    grace_ms: GraceOpt = DEFAULT_GRACE_MS,
    min_consecutive: Annotated[int, typer.Option(min=1, help="as `serve --min-consecutive`")] = 1,
    cooldown_ms: Annotated[int, typer.Option(min=0, help="as `serve --cooldown-ms`")] = 0,
    from_topic: Annotated[Optional[str], typer.Option("--from-topic", help="compare with the alerts on this topic")] = None,
    silences: Annotated[Optional[Path], typer.Option("--silences", help="JSON or JSONL file of maintenance silences: "
                                                     "their alerts are dropped, as `serve` drops them")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="csv | parquet | jsonl (default: by extension)")] = None,
    entity_col: EntityColOpt = None,
    entity: EntityOpt = None,
    ts_col: TsColOpt = None,
    features: FeaturesOpt = None,
    bootstrap: BootstrapOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Score a recording with the processor's own windows, model and alert policy, without Kafka."""
    require_extra("eval", "sklearn", *(["matplotlib"] if plot else []))
    from fabwatch.stream.offline import evaluate
    from fabwatch.stream.policy import PolicyConfig
    from fabwatch.stream.silences import load_silences

    ev = evaluate.evaluate_file(registry, data, label_col=label_col, fmt=fmt, entity_col=entity_col, ts_col=ts_col,
                                features=column_list(features), entity=entity, skip_rows=skip_rows, stride=stride,
                                grace_ms=grace_ms,
                                policy=PolicyConfig(min_consecutive=min_consecutive, cooldown_ms=cooldown_ms),
                                silences=load_silences(silences) if silences is not None else None)
    report = dict(ev.metrics)
    if predictions:
        evaluate.write_predictions(ev, predictions)
        report["predictions"] = str(predictions)
    if plot:
        report["plot_entity"] = evaluate.plot_entity(ev, plot, plot_entity)
        report["plot"] = str(plot)
    if from_topic:
        report["live_comparison"] = evaluate.compare_with_topic(ev, settings_for(bootstrap), from_topic)
    emit(report, as_json, _evaluation_text(report))


def _evaluation_text(report: dict) -> str:
    lines = [f"model {report['model_version']}: {report['rows_scored']} of {report['rows_in_file']} rows scored, "
             f"{report['alerts_opened']} alerts opened ({report['readings_per_s']} readings/s)"
             + (f", {report['alerts_silenced']} alerts silenced" if "alerts_silenced" in report else "")]
    for section in ("pointwise", "eventwise", "live_comparison"):
        if section in report:
            lines.append(f"{section}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                    for k, v in report[section].items()))
    lines += [f"{k}: {report[k]}" for k in ("predictions", "plot") if k in report]
    return "\n".join(lines)


# ---- sidecar trainer ------------------------------------------------------------------------------

@app.command("trainer")
def trainer_cmd(
    registry: Annotated[Path, typer.Option("--registry", help="model registry to improve (needs a current version)")],
    store: Annotated[Path, typer.Option("--store", help="Parquet store of the readings seen")] = Path(".fabwatch/store"),
    every: Annotated[Optional[str], typer.Option("--every", help="retrain every DURATION (30m, 6h, 1d)")] = None,
    daily: Annotated[Optional[str], typer.Option("--daily", help="retrain daily at HH:MM (UTC)")] = None,
    once: Annotated[bool, typer.Option("--once", help="ingest what is there, retrain now, exit")] = False,
    time_budget: Annotated[Optional[str], typer.Option("--time-budget", help="stop training after DURATION")] = None,
    margin: Annotated[float, typer.Option(min=0, help="promote unless worse than serving by this fraction")] = 0.02,
    quality_floor: Annotated[bool, typer.Option(help="reject a candidate no better than chance on the gate slice, "
                                                 "whatever --margin says")] = True,
    recent_days: Annotated[int, typer.Option(min=1, help="days of recent readings to train on")] = 7,
    older_sample: Annotated[int, typer.Option(min=0, help="reservoir sample of older readings")] = 200_000,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="override the training epochs")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="few epochs, every 4th window (demo, CI)")] = False,
    cold_start: Annotated[bool, typer.Option("--cold-start", help="train from scratch, not from the serving weights")] = False,
    drift_window: Annotated[str, typer.Option("--drift-window", help="drift check: compare this much of the newest "
                                              "readings (DURATION) with the serving version's training data")] = "24h",
    drift_every: Annotated[str, typer.Option("--drift-every", help="check drift every DURATION")] = "1h",
    drift_limit: Annotated[float, typer.Option("--drift-limit", min=0, help="a feature's PSI above this is drift "
                                               "(under 0.1 none, 0.1-0.25 moderate, above 0.25 major)")] = 0.25,
    retrain_on_drift: Annotated[bool, typer.Option("--retrain-on-drift", help="retrain before the schedule when "
                                                   "drift passes --drift-limit")] = False,
    drift_gap: Annotated[str, typer.Option("--drift-gap", help="a drift retrain waits DURATION after the last "
                                           "retrain ended")] = "6h",
    metrics_port: Annotated[Optional[int], typer.Option(help="Prometheus /metrics on this port")] = None,
    metrics_host: MetricsHostOpt = DEFAULT_METRICS_HOST,
    bootstrap: BootstrapOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """The sidecar retrainer: store what flows through Kafka, retrain, gate, promote, notify processors."""
    import logging
    import signal

    from fabwatch.models.sidecar.trainer import Trainer, TrainerOptions, parse_every, serve_metrics

    if sum((every is not None, daily is not None, once)) != 1:
        raise UsageError("choose one schedule: --every DURATION, --daily HH:MM or --once")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = TrainerOptions(registry=registry, store=store, recent_days=recent_days, older_sample=older_sample,
                             margin=margin, quality_floor=quality_floor, time_budget_s=parse_every(time_budget) if time_budget else None,
                             epochs=epochs, quick=quick, warm_start=not cold_start,
                             drift_window_s=parse_every(drift_window, "--drift-window"),
                             drift_every_s=parse_every(drift_every, "--drift-every"), drift_limit=drift_limit,
                             retrain_on_drift=retrain_on_drift, drift_gap_s=parse_every(drift_gap, "--drift-gap"))
    trainer = Trainer(settings_for(bootstrap), options)
    if metrics_port is not None:
        serve_metrics(trainer.metrics, metrics_port, metrics_host)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        trainer.run(every_s=parse_every(every) if every else None, daily=daily, once=once, stop=lambda: stopping)
    finally:
        trainer.close()
    if once:
        history = trainer.registry.root / "decisions.jsonl"
        last = history.read_text().splitlines()[-1] if history.exists() else "{}"
        emit(json.loads(last), as_json, last)


# ---- benchmarks -----------------------------------------------------------------------------------

@bench_app.command("kafka")
def bench_kafka(bootstrap: BootstrapOpt = None,
                messages: Annotated[int, typer.Option(help="messages to produce and consume")] = 200_000,
                as_json: JsonFlag = False) -> None:
    """Raw produce and consume rates of 200-byte JSON readings: the baseline for the processor."""
    from fabwatch.stream.bench.kafka import kafka_baseline

    result = kafka_baseline(settings_for(bootstrap), messages=messages)
    emit(result, as_json, "\n".join(f"{k}: {v}" for k, v in result.items()))


def _register_areas() -> None:
    """Each area owns its commands in its own module (imports stay light: no TensorFlow here)."""
    from fabwatch.stream.cli.alerts import register as register_alerts
    from fabwatch.stream.cli.train import register as register_models
    from fabwatch.stream.cli.logs import register as register_logs
    from fabwatch.stream.cli.serve import register as register_serve
    from fabwatch.stream.cli.silence import register as register_silence

    for register in (register_models, register_serve, register_logs, register_alerts, register_silence):
        register(app, bench_app)


_register_areas()


def setting_error_line(exc: pydantic.ValidationError) -> str:
    """One line naming the environment variable behind the first bad setting (pydantic's dump is many)."""
    err = exc.errors()[0]
    name = "_".join(str(part) for part in err["loc"] if not isinstance(part, int)).upper()
    return f"bad setting {ENV_PREFIX}_{name}={err.get('input')!r}: {err['msg']}"


def main() -> None:
    """Console entry point: exit 2 with one line for bad usage, input or settings, 1 for anything else."""
    try:
        app(auto_envvar_prefix=ENV_PREFIX)  # standalone: click handles usage errors (exit 2), raises SystemExit
    except UsageError as exc:
        typer.echo(f"fabwatch: {exc}", err=True)
        sys.exit(2)
    except pydantic.ValidationError as exc:
        typer.echo(f"fabwatch: {setting_error_line(exc)}", err=True)
        sys.exit(2)
    except Exception as exc:
        typer.echo(f"fabwatch: error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
