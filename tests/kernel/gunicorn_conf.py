"""gunicorn configuration for tests/kernel/test_gunicorn.py: examples/gunicorn with an in-memory reader.

The master instruments itself before forking, as in examples/gunicorn; each
worker writes, as it exits, the points its own MeterProvider (the master's,
inherited) exports and what the app counted itself, to
$OTEL_EBPF_FLOWS_TEST_DIR/worker-PID.json; the master writes master.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

bind = os.environ["EXAMPLE_BIND"]
workers = int(os.environ["EXAMPLE_WORKERS"])
graceful_timeout = 20
OUT = os.environ["OTEL_EBPF_FLOWS_TEST_DIR"]
_telemetry: Any = None


def _write(name: str, data: Any) -> None:
    path = os.path.join(OUT, name)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.rename(path + ".tmp", path)


def on_starting(server: Any) -> None:
    global _telemetry
    from tests.kernel.harness import Telemetry

    _telemetry = Telemetry()  # MeterProvider + InMemoryMetricReader, instrument(): in the master


def post_worker_init(worker: Any) -> None:
    """Test synchronisation only: say when this worker's probes are loaded (the restart is async)."""
    from otel_ebpf_flows import EbpfFlowsInstrumentor

    deadline = time.monotonic() + 30
    while EbpfFlowsInstrumentor().pipeline is None and time.monotonic() < deadline:
        time.sleep(0.01)
    _write(f"ready-{os.getpid()}", {"restarted": EbpfFlowsInstrumentor().pipeline is not None})


def worker_exit(server: Any, worker: Any) -> None:
    app = sys.modules.get("app")
    _write(f"worker-{os.getpid()}.json", {
        "pid": os.getpid(),
        "served": getattr(app, "SERVED", 0),
        "upstream": getattr(app, "UPSTREAM_CONNECTS", 0),
        "points": _telemetry.points(),
    })


def on_exit(server: Any) -> None:
    _write("master.json", {"pid": os.getpid(), "points": _telemetry.points()})
