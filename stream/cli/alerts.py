"""``fabwatch alerts tail|forward``: follow the alert topic; route it to a webhook or Alertmanager
(``stream/alerts/``)."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from fabwatch.export.errors import UsageError
from fabwatch.stream.cli.options import BootstrapOpt, settings_for


def alerts_tail(
    bootstrap: BootstrapOpt = None,
    entity: Annotated[Optional[str], typer.Option(help="only this entity")] = None,
    kind: Annotated[Optional[str], typer.Option(help="only this kind (anomaly, delay, spike, log)")] = None,
    from_beginning: Annotated[bool, typer.Option("--from-beginning", help="start at the oldest alert")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON alert per line")] = False,
    max_alerts: Annotated[Optional[int], typer.Option(help="exit after this many alerts")] = None,
) -> None:
    """Follow the alert topic (read_committed) and print alerts readably."""
    import uuid
    from datetime import datetime, timezone

    from confluent_kafka import Consumer

    from fabwatch.stream.schemas import Alert

    settings = settings_for(bootstrap)
    consumer = Consumer(settings.client_config(**{
        "group.id": f"fabwatch-tail-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
        "auto.offset.reset": "earliest" if from_beginning else "latest", "isolation.level": "read_committed"}))
    consumer.subscribe([settings.topics.alerts])
    shown = 0
    try:
        while max_alerts is None or shown < max_alerts:
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            try:
                alert = Alert.model_validate_json(msg.value())
            except ValueError:
                continue
            if (entity and alert.entity != entity) or (kind and alert.kind != kind):
                continue
            shown += 1
            if as_json:
                typer.echo(alert.model_dump_json())
                continue
            when = datetime.fromtimestamp(alert.window_end_ts / 1000, timezone.utc).isoformat(timespec="seconds")
            feats = ", ".join(f"{f.name}={f.contribution:.2f}" for f in alert.top_features)
            typer.echo(f"{when}  {alert.state.upper():6} {alert.severity:8} {alert.kind:7} {alert.entity:12} "
                       f"score {alert.score:.3f} (thr {alert.threshold:.3f})  model {alert.model_version}  "
                       f"top: {feats}  id {alert.alert_id[:12]}")
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


def register(app: typer.Typer, _bench_app: typer.Typer) -> None:
    """Add ``alerts`` to ``app``."""
    alerts_app = typer.Typer(help="The alert topic: follow it, forward it.", no_args_is_help=True)
    app.add_typer(alerts_app, name="alerts")
    alerts_app.command("tail")(alerts_tail)

    @alerts_app.command("forward")
    def forward(webhook: Annotated[Optional[str], typer.Option("--webhook", help="POST each alert's JSON, as "
                                                                "published, to this URL")] = None,
                alertmanager: Annotated[Optional[str], typer.Option("--alertmanager", help="Alertmanager base URL "
                                                                     "(http://host:9093): API v2 alerts")] = None,
                group: Annotated[str, typer.Option(help="consumer group")] = "fabwatch-alerts-forward",
                timeout_s: Annotated[float, typer.Option("--timeout-s", min=0.1, help="one HTTP request")] = 10.0,
                backoff_s: Annotated[float, typer.Option("--backoff-s", min=0.0, help="exponential backoff "
                                                         "factor between retries")] = 0.5,
                backoff_max_s: Annotated[float, typer.Option("--backoff-max-s", min=0.0, help="longest wait "
                                                             "between retries (Retry-After included)")] = 30.0,
                open_ttl_s: Annotated[float, typer.Option("--open-ttl-s", min=1.0, help="Alertmanager: an open "
                                                          "alert fires this long unless its close comes")] = 86_400.0,
                generator_url: Annotated[Optional[str], typer.Option("--generator-url", help="Alertmanager: "
                                                                     "back-link on every alert")] = None,
                metrics_port: Annotated[Optional[int], typer.Option(help="Prometheus /metrics on this port")] = None,
                bootstrap: BootstrapOpt = None,
                log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO") -> None:
        """Deliver every alert (open and close), at least once: offsets are committed after the receiver's 2xx;
        5xx/408/429 and network errors are retried with capped backoff (the stream waits), other 4xx go to the
        DLQ as delivery_refused."""
        import logging

        from prometheus_client import start_http_server

        from fabwatch.stream.alerts.forward import ForwardConfig, Forwarder

        if (webhook is None) == (alertmanager is None):
            raise UsageError("give one of --webhook URL or --alertmanager URL")
        logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        settings = settings_for(bootstrap)
        config = ForwardConfig(url=webhook or alertmanager or "", format="webhook" if webhook else "alertmanager",
                               group_id=group, timeout_s=timeout_s, backoff_s=backoff_s, backoff_max_s=backoff_max_s,
                               open_ttl_s=open_ttl_s, generator_url=generator_url,
                               max_message_bytes=settings.max_message_bytes)
        forwarder = Forwarder(settings, config)
        if metrics_port is not None:
            start_http_server(metrics_port, registry=forwarder.metrics.registry)
        forwarder.install_signal_handlers()
        forwarder.run()
