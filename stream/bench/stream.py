"""``fabwatch bench stream``: the processor's throughput against the raw consumer, and its latency.

(a) raw confluent-kafka consume rate of the benchmark readings; (b) the processor with a no-op ONNX
model (its own overhead: decode, windows, policy, commits) and the ratio (b)/(a); (c) the processor
with the full-size ensemble on CPU at stride 1 and 10; (d) ingest-to-alert latency p50/p99 at an
offered 1,000 readings/s, measured end to end (reading produced -> alert received by a consumer).
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from fabwatch.export.registry import Registry
from fabwatch.stream.kafka.config import Settings, TopicNames
from fabwatch.stream.kafka.outputs import produce_waiting
from fabwatch.stream.processor import Processor, ProcessorConfig
from fabwatch.stream.bench.tiny_models import add_version, feature_names
from fabwatch.stream.kafka.topics import ensure_topics

N_FEATURES = 12  # the fab data's width
PARTITIONS = 3


def machine() -> dict:
    import confluent_kafka
    import onnxruntime

    cpu = platform.processor() or ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "onnxruntime": onnxruntime.__version__, "confluent_kafka": confluent_kafka.version()[0],
            "librdkafka": confluent_kafka.libversion()[0],
            "load_average_1m": round(os.getloadavg()[0], 2)}


def _fresh_settings(base: Settings) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    topics = TopicNames(**{k: f"{v}.bench.{suffix}" for k, v in TopicNames().model_dump().items()})
    return base.model_copy(update={"topics": topics})


def _readings(n: int, entities: int, seed: int = 0, t0: int = 1_700_000_000_000) -> list[bytes]:
    rng = np.random.default_rng(seed)
    values = np.round(10 + 2 * rng.standard_normal((n, N_FEATURES)), 4).tolist()
    return [orjson.dumps({"entity": f"E{i % entities:05d}", "ts": t0 + (i // entities) * 1000, "values": values[i]})
            for i in range(n)]


def _produce(settings: Settings, topic: str, raws: list[bytes]) -> None:
    p = Producer(settings.client_config(**{"linger.ms": 20, "batch.num.messages": 10_000, "compression.type": "lz4"}))
    for raw in raws:
        key = raw[11:17]  # b'E00042' (the entity; readings keyed by entity)
        produce_waiting(p, topic, raw, key)
    p.flush(60)


def raw_consume_rate(settings: Settings, topic: str, n: int) -> float:
    """Readings/s of a bare consumer touching every value (the ceiling for the processor)."""
    c = Consumer(settings.client_config(**{"group.id": f"bench-raw-{uuid.uuid4().hex[:6]}",
                                           "enable.auto.commit": False}))
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    got, t0 = 0, None
    size = 0
    while got < n:
        msgs = c.consume(512, 1.0)
        if msgs and t0 is None:
            t0 = time.perf_counter()
        for m in msgs:
            if m.error() is None:
                size += len(m.value())
                got += 1
    elapsed = time.perf_counter() - t0
    c.close()
    return n / elapsed


def processor_rate(settings: Settings, registry: Path, n: int, stride: int = 1, skip: int = 0,
                   providers: list[str] | None = None, max_batch: int = ProcessorConfig.max_batch) -> dict:
    """Readings/s of an in-process processor between its ``skip``-th consumed reading (past the warm-up
    that only fills windows) and its ``n``-th."""
    proc = Processor(settings, ProcessorConfig(registry=registry, group_id=f"bench-{uuid.uuid4().hex[:6]}",
                                               stride=stride, instance_id="bench", providers=providers,
                                               max_batch=max_batch))
    runner = threading.Thread(target=proc.run, daemon=True)
    runner.start()
    consumed = proc.metrics.consumed
    t0 = first = None
    while True:
        count = consumed._value.get()
        if count > skip and t0 is None:
            t0, first = time.perf_counter(), count
        if count >= n:
            break
        if not runner.is_alive():
            raise RuntimeError("the processor stopped during the benchmark")
        time.sleep(0.002)
    elapsed = time.perf_counter() - t0
    proc.stop()
    runner.join(600)
    return {"readings_per_s": round((count - first) / elapsed), "readings_timed": int(count - first),
            "stride": stride}


def latency(settings: Settings, registry: Path, entities: int, rate: float, seconds: float,
            spike_every: int = 25) -> dict:
    """Offer ``rate`` readings/s to a ``fabwatch serve`` subprocess (after a warm-up that fills every
    window); one reading in ``spike_every`` is a spike, which opens an alert that the next window closes.
    Each alert is timed end to end: its closing reading produced -> the alert received by a consumer."""
    import subprocess

    topic = settings.topics.sensors
    env = {**os.environ, "FABWATCH_BOOTSTRAP": settings.resolve_bootstrap(),
           **{f"FABWATCH_TOPIC_{k.upper()}": v for k, v in settings.topics.model_dump().items()}}
    server = subprocess.Popen([sys.executable, "-m", "fabwatch.stream.cli.main", "serve", "--registry", str(registry),
                               "--group", f"bench-lat-{uuid.uuid4().hex[:6]}", "--max-wait-ms", "5",
                               "--log-level", "WARNING"], env=env, stdin=subprocess.DEVNULL)
    try:
        sent: dict[tuple[str, int], float] = {}
        lat: list[float] = []
        inside: list[float] = []  # the alerts' own ingest_to_alert_ms: reading produced -> alert built
        rx = Consumer(settings.client_config(**{"group.id": f"bench-rx-{uuid.uuid4().hex[:6]}",
                                                "enable.auto.commit": False, "fetch.wait.max.ms": 5}))
        rx.assign([TopicPartition(settings.topics.alerts, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        done = threading.Event()

        def receive() -> None:
            while not done.is_set():
                for m in rx.consume(1000, 0.05):
                    if m.error() is None:
                        now = time.time() * 1000
                        a = orjson.loads(m.value())
                        t = sent.get((a["entity"], a["window_end_ts"]))
                        if t is not None:
                            lat.append(now - t)
                            inside.append(a["ingest_to_alert_ms"])

        receiver = threading.Thread(target=receive, daemon=True)
        receiver.start()
        p = Producer(settings.client_config(**{"linger.ms": 0}))
        rng = np.random.default_rng(1)
        t0_ts = 1_700_000_000_000

        def reading(e: int, step: int, spike: bool) -> tuple[str, int, bytes]:
            values = 10 + 2 * rng.standard_normal(N_FEATURES)
            if spike:
                values[0] = 10 + 2 * 12.0
            entity, ts = f"L{e:03d}", t0_ts + step * 1000
            return entity, ts, orjson.dumps({"entity": entity, "ts": ts, "values": values.tolist()})

        for step in range(99):  # warm-up: 99 readings per entity, not timed
            for e in range(entities):
                entity, _, raw = reading(e, step, False)
                p.produce(topic, raw, entity.encode())
        p.flush(30)
        time.sleep(5.0)  # the server starts and scores nothing yet (no window is full)
        total = int(rate * seconds)
        start = time.perf_counter()
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            spike = i % spike_every == 0
            entity, ts, raw = reading(i % entities, 99 + i // entities, spike)
            sent[(entity, ts)] = time.time() * 1000
            p.produce(topic, raw, entity.encode())
            p.poll(0)
        achieved = total / (time.perf_counter() - start)
        p.flush(30)
        seen, deadline = -1, time.monotonic() + 15
        while len(lat) != seen and time.monotonic() < deadline:  # until no alert arrives for a second
            seen = len(lat)
            time.sleep(1.0)
        done.set()
        receiver.join(5)
        rx.close()
    finally:
        server.terminate()
        server.wait(30)
    arr = np.asarray(lat)
    return {"offered_readings_per_s": rate, "achieved_readings_per_s": round(achieved), "readings": total,
            "alerts_timed": int(arr.size),
            "p50_ms": round(float(np.percentile(arr, 50)), 2), "p99_ms": round(float(np.percentile(arr, 99)), 2),
            "max_ms": round(float(arr.max()), 2),
            "in_processor_p50_ms": round(float(np.percentile(inside, 50)), 2),
            "in_processor_p99_ms": round(float(np.percentile(inside, 99)), 2)}


def _full_size_registry(root: Path, log: Callable[[str], None]) -> Path | None:
    """The untrained full-size ensemble exported into a registry; None (and why) without TF or its builders."""
    try:
        from fabwatch.models import ensemble
        from fabwatch.models.training.train import write_version
    except ImportError as exc:
        log(f"(c) skipped: the full-size ensemble needs the [train] extra and fabwatch.models.ensemble ({exc})")
        return None
    from fabwatch.export.registry import Manifest, Registry, Scaler, Thresholds

    log("(c) exporting the full-size ensemble (untrained weights: same compute as a trained one)...")
    model = ensemble.build(window=100, n_features=N_FEATURES, task="classify", size="full")
    manifest = Manifest(version="", created="", task="classify", feature_names=feature_names(N_FEATURES),
                        scaler=Scaler(mean=[10.0] * N_FEATURES, std=[2.0] * N_FEATURES),
                        thresholds=Thresholds(alert=1e9, close=1e9), members=list(ensemble.MEMBERS),
                        extra={"size": "full", "parameters": ensemble.parameter_counts(model)})
    write_version(model, manifest, Registry(root))
    return root


def run_bench(base: Settings, messages: int = 200_000, entities: int = 200, latency_seconds: float = 15.0,
              full_readings: int = 16_000, rounds: int = 5, log: Callable[[str], None] = print) -> dict:
    settings = _fresh_settings(base)
    ensure_topics(settings, settings.topics.all(), partitions=PARTITIONS)
    out: dict = {"command": " ".join(["fabwatch", *sys.argv[1:]]) if sys.argv else "fabwatch bench stream",
                 "machine": machine(), "bootstrap": settings.resolve_bootstrap(), "messages": messages,
                 "entities": entities, "features": N_FEATURES, "partitions": PARTITIONS}
    with tempfile.TemporaryDirectory(prefix="fabwatch-bench-") as tmp:
        noop, spike = Path(tmp) / "noop", Path(tmp) / "spike"
        add_version(noop, N_FEATURES, kind="noop", alert=1e9, close=1e9, critical=None)
        add_version(spike, N_FEATURES)
        log(f"producing {messages} readings ({entities} entities x {N_FEATURES} features)...")
        _produce(settings, settings.topics.sensors, _readings(messages, entities))
        raw_rates, noop_rates = [], []
        for round_ in range(rounds):  # alternated rounds, best of each: a shared machine is noisy
            log(f"(a) raw consume, round {round_ + 1}/{rounds}...")
            raw_rates.append(round(raw_consume_rate(settings, settings.topics.sensors, messages)))
            log(f"(b) processor with a no-op model, round {round_ + 1}/{rounds}...")
            noop_rates.append(processor_rate(settings, noop, messages, skip=entities * 100)["readings_per_s"])
        out["a_raw_consume_per_s"] = {"best": max(raw_rates), "rounds": raw_rates}
        out["b_processor_noop_per_s"] = {"best": max(noop_rates), "rounds": noop_rates, "stride": 1,
                                         "timed": "after the warm-up (100 readings per entity)"}
        out["b_over_a"] = round(max(noop_rates) / max(raw_rates), 3)
        out["b_over_a_ok"] = out["b_over_a"] >= 0.5
        full = _full_size_registry(Path(tmp) / "full", log)
        if full is None:
            out["c_full_ensemble"] = "skipped: no full-size ensemble available (fabwatch.models.ensemble / [train] extra)"
        else:  # CPU inference dominates: 20 entities (short warm-up) and fewer readings suffice
            c_settings = _fresh_settings(base)
            ensure_topics(c_settings, c_settings.topics.all(), partitions=PARTITIONS)
            warm = 20 * 100
            _produce(c_settings, c_settings.topics.sensors, _readings(warm + full_readings, 20, seed=2))
            out["c_full_ensemble"] = {
                "parameters": Registry(full).manifest("v0001").extra.get("parameters", {}).get("total"),
                "provider": "CPUExecutionProvider"}
            for k, n_k in ((1, full_readings // 8), (10, full_readings)):
                log(f"(c) full-size ensemble, stride {k}...")
                out["c_full_ensemble"][f"stride_{k}"] = processor_rate(
                    c_settings, full, warm + n_k, stride=k, skip=warm, providers=["CPUExecutionProvider"])
        log(f"(d) latency at 1,000 readings/s for {latency_seconds:.0f}s...")
        lat_settings = _fresh_settings(base)
        ensure_topics(lat_settings, lat_settings.topics.all(), partitions=PARTITIONS)
        out["d_latency"] = latency(lat_settings, spike, entities=20, rate=1000.0, seconds=latency_seconds)
        out["d_latency"]["model"] = "tiny spike model (fabwatch serve subprocess, at-least-once)"
    out["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)  # 2 shared cores: the figures move with it
    return out
