"""Settings for every fabwatch process, from the environment (prefix ``FABWATCH_``) or flags.

Secured clusters: set ``FABWATCH_SECURITY_PROTOCOL``, ``FABWATCH_SASL_*``, ``FABWATCH_SSL_*``, or pass
any other librdkafka property as JSON in ``FABWATCH_KAFKA_OPTIONS`` (``{"client.rack": "a"}``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fabwatch.export.errors import UsageError
from fabwatch.stream.schemas import EventTimeBounds


class TopicNames(BaseSettings):
    """Topic names; override with ``FABWATCH_TOPIC_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="FABWATCH_TOPIC_", extra="ignore")

    sensors: str = "fabwatch.sensors"
    alerts: str = "fabwatch.alerts"
    scores: str = "fabwatch.scores"
    dlq: str = "fabwatch.dlq"
    models: str = "fabwatch.models"
    logkeys: str = "fabwatch.logkeys"
    silences: str = "fabwatch.silences"  # compacted (``kafka/topics.py``)
    policy_state: str = "fabwatch.policy-state"  # compacted, co-partitioned with sensors (``kafka/state.py``)

    def all(self) -> list[str]:
        return [self.sensors, self.alerts, self.scores, self.dlq, self.models, self.logkeys, self.silences,
                self.policy_state]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FABWATCH_", extra="ignore")

    home: Path = Field(default=Path(".fabwatch"), description="local state: broker data, jar cache, pid files")
    bootstrap: str | None = Field(default=None, description="Kafka bootstrap servers; else $KAFKA_BOOTSTRAP_SERVERS, else the local broker")
    partitions: int = Field(default=3, ge=1, description="partitions for topics fabwatch creates")
    replication_factor: int = Field(
        default=-1, description="replication factor of topics fabwatch creates; -1: the broker's "
        "default.replication.factor")
    max_message_bytes: int = Field(default=1_000_000, ge=1024, description="readings larger than this go to the DLQ as too_large")
    max_future_skew_s: float | None = Field(
        default=600.0, ge=0, description="readings dated further after their broker timestamp (or the wall clock) "
        "go to the DLQ as clock_skew; unset: unbounded")
    max_past_skew_s: float | None = Field(
        default=None, ge=0, description="readings dated further before their broker timestamp go to the DLQ as "
        "clock_skew; unset (the default): unbounded, so recorded history can be replayed")

    security_protocol: str | None = None
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    ssl_key_password: SecretStr | None = None
    kafka_options: dict[str, str | bool | int | float] = Field(
        default_factory=dict, description="extra librdkafka properties as JSON: strings, numbers or booleans")

    topics: TopicNames = Field(default_factory=TopicNames)

    @field_validator("replication_factor")
    @classmethod
    def _broker_default_or_positive(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError("must be -1 (the broker's default.replication.factor) or at least 1")
        return value

    def resolve_bootstrap(self) -> str:
        """Flag/env ``FABWATCH_BOOTSTRAP``, then ``KAFKA_BOOTSTRAP_SERVERS``, then the running local broker."""
        if self.bootstrap:
            return self.bootstrap
        env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if env:
            return env
        from fabwatch.stream.kafka.broker import LocalBroker

        state = LocalBroker(self.home).running_state()
        if state is None:
            raise NoBrokerError(
                "no Kafka bootstrap given and no local broker running: "
                "run `fabwatch broker up`, or set KAFKA_BOOTSTRAP_SERVERS"
            )
        return state.bootstrap

    def event_time_bounds(self) -> EventTimeBounds:
        """The clock-skew bounds every reading consumer checks (processor and trainer store alike)."""
        ms = lambda s: None if s is None else int(s * 1000)  # noqa: E731
        return EventTimeBounds(future_ms=ms(self.max_future_skew_s), past_ms=ms(self.max_past_skew_s))

    def client_config(self, **overrides: Any) -> dict[str, Any]:
        """librdkafka configuration shared by producers, consumers and the admin client."""
        conf: dict[str, Any] = {"bootstrap.servers": self.resolve_bootstrap()}
        secured = {
            "security.protocol": self.security_protocol,
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password.get_secret_value() if self.sasl_password else None,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
            "ssl.key.password": self.ssl_key_password.get_secret_value() if self.ssl_key_password else None,
        }
        conf.update({k: v for k, v in secured.items() if v is not None})
        conf.update(self.kafka_options)
        conf.update(overrides)
        return conf


class NoBrokerError(UsageError):
    """No Kafka cluster to talk to (a usage problem: exit code 2)."""
