"""The examples, run as a user runs them, exporting to a real OTLP receiver (rotel).

examples/auto_instrumentation/run starts a backend and a frontend, each under
``opentelemetry-instrument`` and configured by environment variables only; what
arrives must carry each process's own service.name, with the connections the
two made, each side's bytes reconciled with the other's. The collector
example's app.env is then used as it is, only pointed at the test receiver.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from typing import Any, Dict, List

import pytest

from .conftest import ROOT, Receiver, collections, free_ports, our_metrics, plain, select, total

SCOPE = "otel_ebpf_flows"
RUN = os.path.join(ROOT, "examples", "auto_instrumentation", "run")
APP_ENV = os.path.join(ROOT, "examples", "collector", "app.env")
REQUESTS = 7
ATTEMPTS = "ebpf_flows.tcp.connection.attempts"
CLOSES = "ebpf_flows.tcp.connection.closes"
ACTIVE = "ebpf_flows.tcp.connections.active"
IO = "ebpf_flows.tcp.io"


@pytest.fixture(autouse=True)
def _examples_deps(otlp_ok: None) -> None:
    for module, package in (("requests", "requests"),
                            ("opentelemetry.instrumentation.requests", "opentelemetry-instrumentation-requests")):
        try:
            __import__(module)
        except ImportError:
            reason = f"the example needs {package} (pip install -e '.[test]')"
            if os.environ.get("CI"):
                pytest.fail(reason)
            pytest.skip(reason)


def _last(batches: List[Dict[str, Any]]) -> Dict[str, Any]:
    by_time = collections(our_metrics(batches, SCOPE))
    assert by_time, "nothing from the otel_ebpf_flows scope arrived"
    return by_time[max(by_time)]


def run_example(env_overrides: Dict[str, str], tmp_path: Any) -> Dict[str, Any]:
    """Run examples/auto_instrumentation/run with a clean OTEL_* environment plus ``env_overrides``."""
    backend_port, = free_ports(1)
    closed = socket.socket()  # bound, never listening: a connect to it is refused
    closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    tag = uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        PYTHON=sys.executable,
        BACKEND_PORT=str(backend_port),
        REQUESTS=str(REQUESTS),
        INTERVAL="0.05",
        LINGER="1.5",
        REFUSED_URL=f"http://127.0.0.1:{refused_port}/",
        BACKEND_SERVICE_NAME=f"example-backend-{tag}",
        FRONTEND_SERVICE_NAME=f"example-frontend-{tag}",
        OTEL_METRIC_EXPORT_INTERVAL="500",
    )
    env.update(env_overrides)
    try:
        proc = subprocess.run([RUN], env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    finally:
        closed.close()
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "kernel TCP telemetry is off" not in proc.stderr, proc.stderr[-4000:]
    return {"backend_port": backend_port, "refused_port": refused_port,
            "backend": env["BACKEND_SERVICE_NAME"], "frontend": env["FRONTEND_SERVICE_NAME"],
            "stderr": proc.stderr}


def check_example(receiver: Receiver, r: Dict[str, Any]) -> None:
    port = r["backend_port"]

    def complete(service: str, role: str, key: str, expected: int):
        def done(batches: List[Dict[str, Any]]) -> bool:
            by_time = collections(our_metrics(batches, SCOPE))
            return bool(by_time) and total(by_time[max(by_time)], CLOSES, ebpf_flows__tcp__role=role,
                                           **{key: port}) == expected
        return done

    front = receiver.wait_for(r["frontend"], complete(r["frontend"], "client", "network__peer__port", REQUESTS))
    # the backend also accepted ./run's readiness check: one more connection than the frontend made
    back = receiver.wait_for(r["backend"], complete(r["backend"], "server", "network__local__port", REQUESTS + 1))

    for batches, service in ((front, r["frontend"]), (back, r["backend"])):
        for batch in batches:  # selected by service.name, and the rest of the app's Resource is there
            assert batch["resource"]["service.name"] == ["str", service]
            assert batch["resource"]["telemetry.sdk.language"] == ["str", "python"]

    client = _last(front)
    server = _last(back)
    c = dict(ebpf_flows__tcp__role="client", network__peer__port=port)
    s = dict(ebpf_flows__tcp__role="server", network__local__port=port)
    ok = select(client, ATTEMPTS, **c)
    assert len(ok) == 1 and "error.type" not in plain(ok[0]) and ok[0]["value"][1] == REQUESTS
    assert total(client, ATTEMPTS, network__peer__port=r["refused_port"], error__type="refused") == 1
    assert total(client, CLOSES, ebpf_flows__tcp__close__reason="normal", **c) == REQUESTS
    assert total(client, ACTIVE, **c) == 0
    assert total(server, ATTEMPTS, **s) == REQUESTS + 1
    assert total(server, CLOSES, ebpf_flows__tcp__close__reason="normal", **s) == REQUESTS + 1
    assert total(server, ACTIVE, **s) == 0
    # the same connections seen from two processes: what one sent and had acknowledged, the other
    # received (the readiness check carried no payload)
    sent = total(client, IO, network__io__direction="transmit", **c)
    assert sent > 0 and sent == total(server, IO, network__io__direction="receive", **s)
    answered = total(server, IO, network__io__direction="transmit", **s)
    assert answered > 0 and answered == total(client, IO, network__io__direction="receive", **c)
    # only each process's own connections: the backend never reports the frontend's client side
    assert not select(server, ATTEMPTS, ebpf_flows__tcp__role="client", network__peer__port=port)
    # and the requests instrumentation ran alongside this one in the frontend
    scopes = {sm["name"] for b in front for sm in b["scopes"]}
    assert "opentelemetry.instrumentation.requests" in scopes, scopes


def test_auto_instrumentation_example(receiver: Receiver, tmp_path: Any) -> None:
    r = run_example({
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint("http/protobuf"),
    }, tmp_path)
    check_example(receiver, r)


def test_collector_app_env_reaches_an_otlp_receiver(receiver: Receiver, tmp_path: Any) -> None:
    """examples/collector/app.env as it is, but for the collector's host:port (the receiver's here)."""
    app_env = {}
    with open(APP_ENV, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                app_env[key] = value
    assert app_env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    assert app_env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://localhost:4317"
    app_env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint("grpc")
    app_env.pop("OTEL_SERVICE_NAME")  # ./run names its two services
    app_env["OTEL_METRIC_EXPORT_INTERVAL"] = "500"
    r = run_example(app_env, tmp_path)
    check_example(receiver, r)
    # the Resource attributes app.env sets arrive too
    for batch in receiver.batches(r["frontend"]):
        assert batch["resource"]["service.namespace"] == ["str", "shop"]
        assert batch["resource"]["deployment.environment.name"] == ["str", "production"]
