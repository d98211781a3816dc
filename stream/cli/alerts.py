"""``fabwatch alerts forward``: route the alert topic to a webhook or Alertmanager (``stream/alerts/``)."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from fabwatch.export.errors import UsageError
from fabwatch.stream.cli.options import BootstrapOpt, settings_for


def register(app: typer.Typer, _bench_app: typer.Typer) -> None:
    """Add ``alerts`` to ``app``."""
    alerts_app = typer.Typer(help="What happens to alerts after the processor: forward them.", no_args_is_help=True)
    app.add_typer(alerts_app, name="alerts")

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
