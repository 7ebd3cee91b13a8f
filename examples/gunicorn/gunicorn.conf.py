"""Gunicorn with several workers, each reporting the kernel TCP metrics of its own connections.

Run, as root (or with CAP_BPF + CAP_PERFMON), from this directory:

    gunicorn -c gunicorn.conf.py app:app

then, in another terminal, ``curl http://127.0.0.1:8000/`` a few times. The
master instruments itself once, before it forks; every worker restarts the
probes for its own process on the same MeterProvider (nothing to do in
``post_fork``), so each worker's points carry its own ``process.pid`` and count
only the connections that worker accepted or opened. The listening socket the
workers share is counted in claim mode: a connection is counted by the worker
that reads or writes it, never by the others or the master.
"""

from __future__ import annotations

import os

bind = os.environ.get("EXAMPLE_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("EXAMPLE_WORKERS", "3"))
# Each worker's resource gets its own process.pid (the SDK re-detects it after fork).
os.environ.setdefault("OTEL_EXPERIMENTAL_RESOURCE_DETECTORS", "otel,process")


def on_starting(server: object) -> None:
    """In the master, before any worker is forked."""
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    from otel_ebpf_flows import EbpfFlowsInstrumentor

    provider = MeterProvider(
        resource=Resource.create({"service.name": "gunicorn-example"}),
        metric_readers=[PeriodicExportingMetricReader(ConsoleMetricExporter(), export_interval_millis=10_000)],
    )
    metrics.set_meter_provider(provider)
    EbpfFlowsInstrumentor().instrument(meter_provider=provider)
