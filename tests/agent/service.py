"""A service run as ``nobody`` with no capabilities, observed by the node agent (tests/agent).

python -m tests.agent.service HOST PORT --conns N --rounds R --size S [--refused-port P] [--instrumented]

Prints ``ready PID``, waits for ``go`` on stdin, makes its traffic (N threads, each
one connection to HOST:PORT with R request/response rounds of S bytes; then
--refused-port connects that the kernel refuses), prints one JSON line with the
kernel's own per-socket counts (TCP_INFO) and, when --instrumented, the spans it
exported, then waits for ``exit``. Worker threads stay alive until then, so their
thread ids stay valid for the isolation check.

--instrumented: EbpfFlowsInstrumentor on a global SDK TracerProvider and its own
MeterProvider (in memory); without privilege it must choose mode agent, enrich
spans through the agent and register no ebpf_flows metric.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
from typing import Any, Dict, List, Optional

from tests.kernel.harness import drain_until_eof, in_threads, recv_exactly, tcp_info


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--conns", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--size", type=int, default=20000)
    p.add_argument("--refused-port", type=int, default=0)
    p.add_argument("--refused", type=int, default=3)
    p.add_argument("--instrumented", action="store_true")
    args = p.parse_args()

    tracer: Any = None
    spans: Any = None
    reader: Any = None
    instrumentor: Any = None
    if args.instrumented:
        from opentelemetry import trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        from otel_ebpf_flows import EbpfFlowsInstrumentor
        from tests.kernel.span_scenarios import Spans

        spans = Spans()
        reader = InMemoryMetricReader()
        instrumentor = EbpfFlowsInstrumentor()
        instrumentor.instrument(meter_provider=MeterProvider(metric_readers=[reader]))
        tracer = trace.get_tracer("agent-test")

    import os

    print(f"ready {os.getpid()}", flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit(2)

    done = threading.Event()
    tids: List[int] = [0] * args.conns
    payload = b"x" * args.size

    def one(i: int) -> Dict[str, Any]:
        tids[i] = threading.get_native_id()
        requests = []
        s: Optional[socket.socket] = None
        for r in range(args.rounds):
            if tracer is not None:
                from opentelemetry import trace

                span_cm: Any = tracer.start_as_current_span(
                    "request", kind=trace.SpanKind.CLIENT,
                    attributes={"server.address": args.host, "server.port": args.port})
            else:
                import contextlib

                span_cm = contextlib.nullcontext()
            with span_cm as span:
                if s is None:
                    s = socket.create_connection((args.host, args.port), timeout=60)
                    before = 0
                else:
                    before = tcp_info(s)["total_retrans"]
                s.sendall(payload)
                recv_exactly(s, len(payload))
                after = tcp_info(s)["total_retrans"]
            if span is not None:
                requests.append({"span_id": f"{span.get_span_context().span_id:016x}", "delta": after - before,
                                 "opened": r == 0})
        assert s is not None
        s.shutdown(socket.SHUT_WR)
        drain_until_eof(s)
        info = tcp_info(s)
        s.close()
        return {"info": info, "requests": requests}

    results: List[Any] = [None] * args.conns

    def worker(i: int) -> None:
        try:
            results[i] = one(i)
        except BaseException as exc:  # reported in the JSON line
            results[i] = {"error": repr(exc)}
        done.wait()  # keep the thread (and its id) alive for the isolation check

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.conns)]
    for t in threads:
        t.start()
    while any(r is None for r in results):
        threading.Event().wait(0.05)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise SystemExit(f"traffic failed: {errors}")

    def refuse(_i: int) -> bool:
        try:
            socket.create_connection((args.host, args.refused_port), timeout=10).close()
        except ConnectionRefusedError:
            return True
        return False

    refused = sum(in_threads(refuse, args.refused)) if args.refused_port else 0
    out: Dict[str, Any] = {
        "pid": os.getpid(), "tids": tids, "refused": refused,
        "infos": [r["info"] for r in results], "requests": [q for r in results for q in r["requests"]],
    }
    if instrumentor is not None:
        from otel_ebpf_flows import EbpfFlowsInstrumentor

        agent = EbpfFlowsInstrumentor._agent
        out["mode_agent"] = agent is not None and agent.client.connected
        out["pipeline"] = instrumentor.pipeline is not None
        # what this process itself gets from the agent for its own worker threads
        out["own_slots"] = {str(t): len(agent.client.thread_connections(t)) if agent else 0 for t in tids}
        out["spans"] = spans.finished()
        data = reader.get_metrics_data()
        out["own_metrics"] = sorted({m.name for rm in (data.resource_metrics if data else [])
                                     for sm in rm.scope_metrics for m in sm.metrics})
    print(json.dumps(out), flush=True)
    sys.stdin.readline()  # "exit"
    done.set()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
