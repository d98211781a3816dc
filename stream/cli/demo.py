"""`make demo`: from a fresh clone to live alerts. Runs the same commands a user would, and prints them.

1. local Kafka broker      `fabwatch broker up`
2. synthetic fab data       `fabwatch synth` (history to train on, and one more day to replay)
3. the quick ensemble       `fabwatch train --quick`
4. processor (+ trainer)    `fabwatch serve`, `fabwatch trainer --every ...`
5. a day at high speed      `fabwatch replay --max-speed`, alerts shown live as they arrive
6. evaluation report        `fabwatch evaluate --plot`
then everything is stopped (Ctrl-C too). ``--entities/--days`` make it smaller for the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from fabwatch.stream.kafka.broker import LocalBroker
from fabwatch.stream.kafka.config import Settings, TopicNames
from fabwatch.stream.schemas import Alert

console = Console(highlight=False)


def _fabwatch(args: list[str], env: dict[str, str], log: Path, verbose: bool = False,
             capture: bool = False) -> subprocess.CompletedProcess:
    """One demo step. Library chatter (TensorFlow start-up, tf2onnx's per-node log) goes to ``log``, not the
    screen, unless ``--verbose``; on failure the log's tail is shown."""
    console.print(f"[dim]$ fabwatch {shlex.join(args)}[/]" + ("" if verbose else f"[dim]  (log: {log.name})[/]"))
    with open(log, "a") as log_file:
        proc = subprocess.run([sys.executable, "-m", "fabwatch.stream.cli.main", *(["--verbose"] if verbose else []),
                               *args], env=env, text=True, stdout=subprocess.PIPE if capture else None,
                              stderr=None if verbose else log_file)
    if proc.returncode != 0:
        tail = "" if verbose else log.read_text()[-2000:]
        raise SystemExit(f"demo step failed (exit {proc.returncode}): fabwatch {shlex.join(args)}\n{tail}")
    return proc


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    console.print(f"[dim]$ fabwatch {shlex.join(args)} > {log}[/]")
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "fabwatch.stream.cli.main", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _split_by_time(recording: Path, history: Path, live_day: Path, replay_steps: int) -> None:
    """The last ``replay_steps`` readings of every entity become the day to replay; the rest is history."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from fabwatch.models.training.synth import STEP_MS

    table = pq.read_table(recording)
    ts = table.column("ts")
    cut = pc.subtract(pc.max(ts), pa.scalar(replay_steps * STEP_MS, pa.int64()))
    pq.write_table(table.filter(pc.less_equal(ts, cut)), history)
    pq.write_table(table.filter(pc.greater(ts, cut)), live_day)


def _alert_table(alerts: list[Alert], total: int) -> Table:
    table = Table(title=f"fabwatch alerts (latest 15 of {total})", expand=True)
    for col in ("entity", "kind", "severity", "score", "top features", "window end (UTC)", "model"):
        table.add_column(col)
    for a in alerts[-15:]:
        top = ", ".join(f"{f.name} {f.contribution:+.1f}" for f in a.top_features[:3])
        end = time.strftime("%m-%d %H:%M", time.gmtime(a.window_end_ts / 1000))
        style = {"critical": "bold red", "warning": "yellow"}.get(a.severity, "")
        table.add_row(a.entity, a.kind, a.severity, f"{a.score:.3f}", top, end, a.model_version, style=style)
    return table


def _show_alerts(settings: Settings, replay: subprocess.Popen, idle_s: float, timeout_s: float) -> list[Alert]:
    """Follow the alert topic in a live table until the replay is done and alerts stop coming."""
    consumer = Consumer(settings.client_config(**{"group.id": f"demo-tail-{uuid.uuid4().hex[:6]}",
                                                  "auto.offset.reset": "earliest", "enable.auto.commit": False}))
    consumer.subscribe([settings.topics.alerts])
    alerts: list[Alert] = []
    last, deadline = time.monotonic(), time.monotonic() + timeout_s
    with Live(_alert_table(alerts, 0), console=console, refresh_per_second=4) as live:
        while time.monotonic() < deadline:
            got = [Alert.model_validate_json(m.value()) for m in consumer.consume(500, timeout=0.5)
                   if m.error() is None]
            opened = [a for a in got if a.state == "open"]
            if got:
                last = time.monotonic()
            if opened:
                alerts += opened
                live.update(_alert_table(alerts, len(alerts)))
            if replay.poll() is not None and time.monotonic() - last > idle_s:
                break
    consumer.close()
    return alerts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".fabwatch/demo"))
    parser.add_argument("--entities", type=int, default=16)
    parser.add_argument("--history-days", type=float, default=2.0, help="synthetic history to train on")
    parser.add_argument("--replay-days", type=float, default=1.0, help="the day replayed at high speed")
    parser.add_argument("--anomaly-rate", type=float, default=0.05, help="fraction of readings inside injected events")
    parser.add_argument("--no-trainer", action="store_true", help="do not start the sidecar trainer")
    parser.add_argument("--verbose", action="store_true", help="show library logs (TensorFlow, tf2onnx) on screen")
    args = parser.parse_args(argv)

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    registry, history, live_day = workdir / "registry", workdir / "history.parquet", workdir / "replay_day.parquet"
    report_png, predictions = workdir / "evaluation.png", workdir / "predictions.csv"
    started_at = time.monotonic()

    settings = Settings()
    broker, started_broker = None, False
    if not (settings.bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")):
        console.rule("[bold]1/6 local Kafka broker")
        console.print("[dim]$ fabwatch broker up[/]  (the first run fetches the broker's jars with Maven)")
        broker = LocalBroker(settings.home)
        state, started_broker = broker.up()
        settings.bootstrap = state.bootstrap
        console.print(f"broker at {state.bootstrap}")
    bootstrap = settings.resolve_bootstrap()
    run = uuid.uuid4().hex[:6]  # fresh topics per run: alerts from an earlier demo never show up
    settings.topics = TopicNames(**{k: f"{v}.demo-{run}" for k, v in TopicNames().model_dump().items()})
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "FABWATCH_HOME": str(settings.home.resolve()),
           **{f"FABWATCH_TOPIC_{k.upper()}": v for k, v in settings.topics.model_dump().items()}}
    env.pop("FABWATCH_BOOTSTRAP", None)
    children: list[subprocess.Popen] = []

    def stop_children(*_: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()

    try:
        console.rule("[bold]2/6 synthetic fab data (OHT vehicles and stockers, injected events)")
        recording = workdir / "recording.parquet"
        history_steps, replay_steps = int(args.history_days * 1440), int(args.replay_days * 1440)
        _fabwatch(["synth", "--out", str(recording), "--entities", str(args.entities),
                   "--steps", str(history_steps + replay_steps), "--seed", "1", "--anomaly-rate",
                   str(args.anomaly_rate)], env, workdir / "synth.log", args.verbose)
        _split_by_time(recording, history, live_day, replay_steps)
        console.print(f"history to train on: {history.name}; the last {args.replay_days:g} day(s) to replay: "
                      f"{live_day.name}")

        console.rule("[bold]3/6 train the quick ensemble (five members + gate), export ONNX, promote")
        _fabwatch(["train", "--data", str(history), "--registry", str(registry), "--quick"], env,
                 workdir / "train.log", args.verbose)

        console.rule("[bold]4/6 start the processor" + ("" if args.no_trainer else " and the sidecar trainer"))
        _fabwatch(["topics"], env, workdir / "topics.log", capture=True)
        children.append(_spawn(["serve", "--registry", str(registry), "--metrics-port", "0"], env,
                               workdir / "processor.log"))
        if not args.no_trainer:
            children.append(_spawn(["trainer", "--registry", str(registry), "--store", str(workdir / "store"),
                                    "--every", "10m", "--quick"], env, workdir / "trainer.log"))

        console.rule("[bold]5/6 replay a day of readings at high speed; alerts appear as they arrive")
        console.print(f"[dim]$ fabwatch replay {live_day} --max-speed[/]")
        replay = subprocess.Popen([sys.executable, "-m", "fabwatch.stream.cli.main", "replay", str(live_day), "--max-speed",
                                   "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        children.append(replay)
        alerts = _show_alerts(settings, replay, idle_s=8.0, timeout_s=300.0)
        summary = json.loads(replay.stdout.read() or "{}")
        console.print(f"replayed {summary.get('sent', '?')} readings at {summary.get('msgs_per_s', '?')} msgs/s; "
                      f"{len(alerts)} alerts opened")

        console.rule("[bold]6/6 evaluation report (same windows, model and policy, offline)")
        proc = _fabwatch(["evaluate", "--registry", str(registry), "--data", str(live_day), "--plot", str(report_png),
                          "--predictions", str(predictions), "--json"], env, workdir / "evaluate.log",
                         capture=True)
        report = json.loads(proc.stdout)
        (workdir / "evaluation.json").write_text(json.dumps(report, indent=2))
        point, events = report.get("pointwise", {}), report.get("eventwise", {})
        console.print(f"pointwise precision {point.get('precision', 0):.3f}, recall {point.get('recall', 0):.3f}, "
                      f"ROC-AUC {point.get('roc_auc') or 0:.3f}; events detected {events.get('events_detected')}"
                      f"/{events.get('events')}, false alarms/day {events.get('false_alarms_per_day') or 0:.2f}")
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: shutting down[/]")
        return 130
    finally:
        stop_children()
        if started_broker and broker is not None:
            console.print("[dim]$ fabwatch broker down[/]")
            broker.down()

    console.rule("[bold green]done")
    console.print(f"in {time.monotonic() - started_at:.0f} s. Everything is under {workdir}:\n"
                  f"  data        {history.name}, {live_day.name}\n"
                  f"  registry    {registry} (fabwatch registry list --registry {registry})\n"
                  f"  report      {report_png.name} (plot), evaluation.json, {predictions.name}\n"
                  f"  logs        synth.log, train.log, processor.log" + ("" if args.no_trainer else ", trainer.log"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
