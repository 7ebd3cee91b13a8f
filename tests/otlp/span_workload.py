"""An HTTP client instrumented with no code change, for the OTLP span-enrichment tests.

Run by tests/otlp/test_otlp_spans.py, inside the test's private network namespace, as

    opentelemetry-instrument python -m tests.otlp.span_workload requests PORT ROUNDS SIZE

and configured only by the standard OTEL_* variables: opentelemetry-distro builds
the SDK TracerProvider and MeterProvider with OTLP exporters, and loads
opentelemetry-instrumentation-requests and this package's instrumentor through
their entry points. The application code below is plain ``requests``: ROUNDS
POSTs of SIZE bytes on one keep-alive Session to an uninstrumented HTTP echo
server in another process (tests/kernel/http_peer.py) at 127.0.0.1:PORT, over a
path the test made lossy.

Per request it records the kernel's own count, the change of TCP_INFO
``tcpi_total_retrans`` on the session's pooled connection across the request,
and the id of the request's CLIENT span. The span is the one the
instrumentation made current around ``Session.send``; a response hook
registered on the Session runs inside ``send``, so it reads that span as the
current one (a ``response_hook`` argument cannot be given under
``opentelemetry-instrument``).

It prints ``ready`` once instrumented, then one JSON line with what it did, then
waits for a line on standard input (at most ``EXIT_WAIT_S``) and exits normally,
so that the SDK's shutdown exports the last spans and metrics.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from tests.kernel.harness import tcp_info
from tests.otlp.workload import EXIT_WAIT_S, check_instrumented, fail


def check_tracing() -> None:
    from opentelemetry import trace
    from opentelemetry.instrumentation.requests import RequestsInstrumentor

    provider = trace.get_tracer_provider()
    if type(provider).__module__.split(".")[:3] != ["opentelemetry", "sdk", "trace"]:
        fail(f"no SDK TracerProvider from opentelemetry-instrument: {provider!r}")
    if not RequestsInstrumentor().is_instrumented_by_opentelemetry:
        fail("opentelemetry-instrument did not instrument requests")


def pooled_socket(adapter: Any) -> Optional[socket.socket]:
    """The socket of the (one) idle connection in the adapter's pools."""
    pools = adapter.poolmanager.pools
    for key in pools.keys():
        for conn in list(pools[key].pool.queue):
            if conn is not None and getattr(conn, "sock", None) is not None:
                return conn.sock  # type: ignore[no-any-return]
    return None


def run_requests(port: int, rounds: int, size: int) -> Dict[str, Any]:
    import requests
    from opentelemetry import trace
    from requests.adapters import HTTPAdapter

    current: List[Optional[str]] = [None]

    def record_span(response: Any, *_args: Any, **_kwargs: Any) -> Any:
        ctx = trace.get_current_span().get_span_context()
        current[0] = f"{ctx.span_id:016x}" if ctx.is_valid else None
        return response

    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1)
    session.mount("http://", adapter)
    session.hooks["response"].append(record_span)
    url = f"http://127.0.0.1:{port}/echo"
    out = []
    started = time.monotonic()
    for r in range(rounds):
        sock = pooled_socket(adapter)
        before = tcp_info(sock)["total_retrans"] if sock is not None else 0
        current[0] = None
        resp = session.post(url, data=b"x" * size, timeout=60)
        if len(resp.content) != size:
            fail(f"request {r}: {len(resp.content)} bytes echoed, not {size}")
        after = pooled_socket(adapter)
        if after is None or (sock is not None and after is not sock):
            fail(f"request {r}: the session reconnected; the per-request count would not be the span's")
        if current[0] is None:
            fail(f"request {r}: no current span in the response hook (requests not instrumented?)")
        assert after is not None
        out.append({"span_id": current[0], "delta": tcp_info(after)["total_retrans"] - before,
                    "opened": r == 0})
    elapsed = time.monotonic() - started
    session.close()
    return {"requests": out, "server_port": port, "elapsed": elapsed, "done_unix_nano": time.time_ns()}


def main() -> None:
    check_instrumented()
    check_tracing()
    print("ready", flush=True)
    if sys.argv[1] != "requests":
        fail(f"unknown mode {sys.argv[1]}")
    result = run_requests(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    result["pid"] = os.getpid()
    print(json.dumps(result), flush=True)
    waiter = threading.Thread(target=sys.stdin.readline, daemon=True)
    waiter.start()
    waiter.join(EXIT_WAIT_S)
    # a normal exit: the SDK's atexit shutdown exports the remaining spans and metrics


if __name__ == "__main__":
    main()
