"""``python -m fabwatch.stream.bench.policy_state [--keys 10000 100000] [--json]``: what the alert policy's state
topic costs at a partition's restore. For each count, that many non-quiet keys (a third each of open alerts, runs
and cooldowns; names like ``fab2/etch-0017/ch-3``) are written to partition 0 of a fresh state topic, as the
processor writes them, then ``ChangeLog.restore`` reads them back as an assignment does: its wall time
(a new reader, to the end of the partition), and the bytes the keys and values take on the topic (before the
broker's batching and compression). Needs a broker (``--bootstrap``, else ``$KAFKA_BOOTSTRAP_SERVERS``, else the
local one); the topics are left behind, named ``fabwatch.policy-state.bench.<n>.<time>``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from confluent_kafka import Producer

from fabwatch.stream.bench.kafka import machine_info
from fabwatch.stream.kafka.config import Settings, TopicNames
from fabwatch.stream.kafka.state import ChangeLog, encode_state, state_key
from fabwatch.stream.kafka.topics import ensure_topics
from fabwatch.stream.policy import MINUTE_MS, KeyState

NOW_MS = 1_790_000_000_000
GROUP = "fabwatch-processor"


def _state(i: int, rng: random.Random) -> KeyState:
    last_ms = NOW_MS - rng.randrange(3_600_000)
    role = ("open", "run", "cooldown")[i % 3]
    return KeyState(partition=0, open=role == "open", run=1 if role == "run" else 0,
                    closed_at=last_ms - rng.randrange(600_000) if role == "cooldown" else -1,
                    last_min=last_ms // MINUTE_MS)


def measure(settings: Settings, n: int) -> dict:
    topic = f"{TopicNames().policy_state}.bench.{n}.{time.time_ns()}"
    settings = settings.model_copy(update={"topics": TopicNames(policy_state=topic)})
    ensure_topics(settings, [topic], partitions=1)
    rng = random.Random(n)
    states = {f"fab{i % 3}/etch-{i // 12:04d}/ch-{i % 4}": _state(i, rng) for i in range(n)}
    producer = Producer(settings.client_config(**{"linger.ms": 20, "acks": "all", "enable.idempotence": True}))
    changelog = ChangeLog(settings, GROUP)
    try:
        changelog.produce(producer, [(e, 0, st) for e, st in states.items()], lambda err, msg: None)
        if producer.flush(120):
            raise RuntimeError(f"{n} state records not delivered to {topic} in 120 s")
        t0 = time.perf_counter()
        restored = changelog.restore([0], timeout_s=300)[0]
        restore_s = time.perf_counter() - t0
    finally:
        changelog.close()
    if restored != states:
        raise RuntimeError(f"restored {len(restored)} of {n} keys, or not as written")
    record_bytes = sum(len(state_key(GROUP, e)) + len(encode_state(st)) for e, st in states.items())
    return {"keys": n, "restore_s": round(restore_s, 3), "keys_per_s": round(n / restore_s),
            "record_bytes": record_bytes, "bytes_per_key": round(record_bytes / n, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fabwatch.stream.bench.policy_state",
                                     description="restore time and size of the alert policy's state topic")
    parser.add_argument("--keys", type=int, nargs="+", default=[10_000, 100_000], help="non-quiet keys per run")
    parser.add_argument("--bootstrap", default=None, help="Kafka bootstrap servers")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    settings = Settings(bootstrap=args.bootstrap) if args.bootstrap else Settings()
    results = [measure(settings, n) for n in args.keys]
    machine = {**machine_info(), "command": " ".join(["python -m fabwatch.stream.bench.policy_state",
                                                      *sys.argv[1:]])}
    if args.json:
        print(json.dumps({"machine": machine, "results": results}, indent=2))
        return
    print(f"# {machine}")
    print(f"{'keys':>9}{'restore s':>11}{'keys/s':>10}{'bytes':>12}{'bytes/key':>11}")
    for r in results:
        print(f"{r['keys']:>9}{r['restore_s']:>11.3f}{r['keys_per_s']:>10}{r['record_bytes']:>12}"
              f"{r['bytes_per_key']:>11.1f}")


if __name__ == "__main__":
    main()
