"""`make demo`: the newcomer's first run. For now: broker up, a keyed round trip, broker down."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, Producer
from rich.console import Console

from stream.bench import synthetic_readings
from stream.broker import LocalBroker
from stream.config import Settings
from stream.topics import ensure_topics

console = Console()


def main() -> None:
    settings = Settings()
    broker = LocalBroker(settings.home)
    console.print("[bold]1/3[/] starting the local Kafka broker (first run fetches its jars with Maven)...")
    state, started = broker.up()
    settings.bootstrap = state.bootstrap
    try:
        console.print(f"[bold]2/3[/] broker at {state.bootstrap}; producing and consuming 1,000 readings...")
        topic = f"{settings.topics.sensors}.demo"
        ensure_topics(settings, [topic])
        producer = Producer(settings.client_config(**{"enable.idempotence": True}))
        for key, value in synthetic_readings(1000, entities=20):
            producer.produce(topic, value, key)
        producer.flush(30)
        consumer = Consumer(settings.client_config(**{"group.id": f"demo-{uuid.uuid4().hex[:6]}",
                                                      "auto.offset.reset": "earliest"}))
        consumer.subscribe([topic])
        received, deadline = 0, time.monotonic() + 60
        while received < 1000 and time.monotonic() < deadline:
            received += sum(1 for m in consumer.consume(500, timeout=1.0) if m.error() is None)
        consumer.close()
        console.print(f"    received {received} readings back from {topic}")
    finally:
        if started:
            console.print("[bold]3/3[/] stopping the broker")
            broker.down()
    console.print("[green]demo finished[/]")


if __name__ == "__main__":
    main()
