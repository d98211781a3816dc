"""Shared fixtures. ``kafka_bootstrap`` is a real broker: $KAFKA_BOOTSTRAP_SERVERS, else a
testcontainers Kafka when a Docker engine answers, else the jar broker from ``fabwatch broker up``."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _docker_answers() -> bool:
    try:
        import docker

        return bool(docker.from_env(timeout=3).ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    from fabwatch.stream.kafka.broker import LocalBroker

    broker = LocalBroker(tmp_path_factory.mktemp("fabwatch-home"))
    state, _ = broker.up()
    try:
        yield state.bootstrap
    finally:
        broker.down()


@pytest.fixture(autouse=True)
def _kill_leftover_processors() -> Iterator[None]:
    yield
    from stream_helpers import kill_leftovers

    kill_leftovers()


@pytest.fixture
def unique_topic() -> Iterator[str]:
    """A topic name no other test uses (created on first use or by ensure_topics)."""
    yield f"test.{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(kafka_bootstrap: str, tmp_path: Path):
    """Settings pointing at the test broker, with per-test topic names."""
    from fabwatch.stream.kafka.config import Settings, TopicNames

    suffix = uuid.uuid4().hex[:8]
    topics = TopicNames(**{name: f"{default}.{suffix}" for name, default in TopicNames().model_dump().items()})
    return Settings(bootstrap=kafka_bootstrap, home=tmp_path / "home", topics=topics)


@pytest.fixture
def topics(settings):
    """``settings`` with every fabwatch topic created, ``PARTITIONS`` (stream_helpers) partitions each."""
    from fabwatch.stream.kafka.topics import ensure_topics
    from stream_helpers import PARTITIONS

    ensure_topics(settings, settings.topics.all(), partitions=PARTITIONS)
    return settings


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    """A registry holding one tiny ONNX model (``onnx_fixtures.make_registry``), promoted."""
    from onnx_fixtures import make_registry

    make_registry(tmp_path / "registry")
    return tmp_path / "registry"


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """One quick tiny ensemble trained on synthetic fab data, shared by every test that needs a real
    model (about two minutes on 2 cores). Tests that change its registry must work on a copy."""
    from fabwatch.export.registry import Registry
    from fabwatch.models.training import synth
    from fabwatch.models.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("models-train")
    path = root / "fab.parquet"
    synth.write(synth.generate(entities=6, steps=2500, seed=0, anomaly_rate=0.2), path)
    result = train(TrainConfig.quick(data=path, registry=root / "registry", fp16=True, val_fraction=0.3))
    return result, Registry(root / "registry")
