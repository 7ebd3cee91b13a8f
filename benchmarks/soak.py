"""Soak: an instrumented process under mixed lossy traffic for a long time; memory flat, totals exact.

    unshare --net .venv/bin/python benchmarks/soak.py [--duration 600] [--loss 2] [--no-instrument] [--spans]

As root, in a private network namespace (the command above). The process is both
client and server (so every connection in the namespace is its own, both ends),
and, for --duration seconds, 4 threads make connections to its own listener
through a path that drops --loss % of segments (nftables), with every 10th
connection closed by an RST (SO_LINGER 0), every 25th connect refused (a closed
port) and payloads from 100 B to 200 KB. Every 30 s it records RSS, the bytes
malloc has handed out and not had back (every live C and Python allocation:
libbpf's, ctypes buffers, the SDK's state), the free bytes malloc keeps in its
arenas, Python's traced memory, file descriptors and threads; at the end it waits
until every connection has closed and compares the exported totals with the
namespace's MIB counters. Prints one JSON line; benchmarks/README.md has the last
result.

Memory is flat when nothing live grows: from the first third of the samples to the
last third (medians), malloc's bytes in use and Python's traced memory each grow by
at most FLAT_KB.
RSS is reported next to it but is not the criterion: it also holds the free space
malloc keeps in its per-thread arenas (this soak makes a thread per connection) and
tracemalloc's own tables; ``rss_after_trim_kb`` is RSS after ``malloc_trim(0)`` gave
that free space back. ``--no-instrument``: the same traffic without the library, the
baseline for those figures. ``--spans``: a tracer provider, and a CLIENT span around each
connection (span enrichment on, the span table and the handshake exemplars soaked too): every
span must carry its handshake (``spans.with_handshake`` = ``spans.spans``, less unseen
handshakes) and none say reused.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import random
import socket
import statistics
import struct
import sys
import threading
import time
import tracemalloc
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from opentelemetry.trace import SpanKind, use_span  # noqa: E402

from tests.kernel.harness import (  # noqa: E402
    Telemetry,
    mib,
    mib_delta,
    random_loss,
    recv_exactly,
    settle,
    setup_netns,
)

PORT, CLOSED_PORT = 5600, 5601
FLAT_KB = 1024  # growth of live memory over the whole soak still called flat


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL(None)
_mallinfo2 = getattr(_libc, "mallinfo2", None)  # glibc 2.33+
if _mallinfo2 is not None:
    _mallinfo2.restype = _MallInfo2


def state() -> Dict[str, Any]:
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    out = {"rss_kb": int(status["VmRSS"].split()[0]), "traced_kb": tracemalloc.get_traced_memory()[0] // 1024,
           "tracemalloc_self_kb": tracemalloc.get_tracemalloc_memory() // 1024,
           "fds": len(os.listdir("/proc/self/fd")), "threads": len(os.listdir("/proc/self/task"))}
    if _mallinfo2 is not None:
        mi = _mallinfo2()
        # in use: small blocks handed out plus mmap-ed large ones; free: kept in the arenas
        out.update(malloc_in_use_kb=(mi.uordblks + mi.hblkhd) // 1024, malloc_free_kb=mi.fordblks // 1024)
    return out


def memory_verdict(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Growth from the first third of the samples to the last, and whether live memory stayed flat.

    Medians of each third: the payloads in flight at one sample (up to 200 KB each,
    several per thread) would otherwise decide the figure.
    """
    third = max(1, len(samples) // 3)

    def growth(k: str) -> int:
        return int(statistics.median(s[k] for s in samples[-third:]) - statistics.median(s[k] for s in samples[:third]))

    keys = [k for k in ("rss_kb", "traced_kb", "malloc_in_use_kb", "malloc_free_kb") if k in samples[0]]
    grown = {k: growth(k) for k in keys}
    live = [grown[k] for k in ("traced_kb", "malloc_in_use_kb") if k in grown]
    return {"growth_kb": grown, "flat": all(g <= FLAT_KB for g in live),
            "criterion": f"malloc in use and Python traced memory each grow <= {FLAT_KB} KB "
                         "(median of the last third of the samples against the first third)"}


def child_sockets_discarded(tel: Telemetry) -> int:
    """Sockets created for requests on this process's listeners and closed before ESTABLISHED."""
    from otel_ebpf_flows import _records

    source = tel.instrumentor.pipeline.source  # type: ignore[union-attr]
    value = ctypes.c_uint64()
    source._require().map("stats").lookup(ctypes.c_uint32(_records.STAT_CHILD_DISCARDED), value)
    return value.value


class SpanCount:
    """A tracer provider whose finished spans are counted, not kept: how many, how many carry a
    handshake, how many say their connection was reused."""

    def __init__(self) -> None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

        counts = {"spans": 0, "with_handshake": 0, "reused": 0}
        self.counts = counts
        lock = threading.Lock()

        class Counting(SpanExporter):  # type: ignore[misc]
            def export(self, finished: Any) -> SpanExportResult:
                with lock:
                    for span in finished:
                        attrs = span.attributes or {}
                        counts["spans"] += 1
                        counts["with_handshake"] += "ebpf_flows.tcp.handshake.duration" in attrs
                        counts["reused"] += attrs.get("ebpf_flows.tcp.connection.reused") is True
                return SpanExportResult.SUCCESS

        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(Counting()))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--loss", type=int, default=2)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--no-instrument", action="store_true", help="the same traffic without the library (baseline)")
    p.add_argument("--spans", action="store_true",
                   help="a tracer provider and a CLIENT span around each connection (span enrichment on)")
    args = p.parse_args()

    setup_netns()
    tracemalloc.start()
    spans = SpanCount() if args.spans else None
    tel = None if args.no_instrument else Telemetry(
        **({"tracer_provider": spans.provider} if spans is not None else {}))
    tracer = spans.provider.get_tracer("soak") if spans is not None else None
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", PORT))
    srv.listen(512)
    random_loss(PORT, args.loss)
    stop = threading.Event()
    stop_accepting = threading.Event()  # only once every client is done: none waits in the backlog
    done = {"ok": 0, "rst": 0, "refused": 0, "errors": 0}
    lock = threading.Lock()

    def serve(conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(120)
                while True:
                    head = conn.recv(4)
                    if not head:
                        return
                    if len(head) < 4:
                        head += recv_exactly(conn, 4 - len(head))
                    conn.sendall(recv_exactly(conn, struct.unpack("!I", head)[0]))
        except OSError:
            pass

    def accept_loop() -> None:
        srv.settimeout(0.5)
        while not stop_accepting.is_set():
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    def client(seed: int) -> None:
        rnd = random.Random(seed)
        i = 0
        while not stop.is_set():
            i += 1
            try:
                if i % 25 == 0:
                    try:
                        socket.create_connection(("127.0.0.1", CLOSED_PORT), timeout=30).close()
                    except ConnectionRefusedError:
                        with lock:
                            done["refused"] += 1
                    continue
                span = None if tracer is None else tracer.start_span(
                    "connection", kind=SpanKind.CLIENT, attributes={"server.address": "127.0.0.1", "server.port": PORT})
                try:
                    with use_span(span, end_on_exit=False) if span is not None else contextlib.nullcontext():
                        s = socket.create_connection(("127.0.0.1", PORT), timeout=60)
                        for _ in range(rnd.randint(1, 4)):
                            size = rnd.choice((100, 1000, 20_000, 200_000))
                            s.sendall(struct.pack("!I", size) + b"s" * size)
                            recv_exactly(s, size)
                        if i % 10 == 0:
                            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                            key = "rst"
                        else:
                            key = "ok"
                        s.close()
                finally:
                    if span is not None:
                        span.end()
                with lock:
                    done[key] += 1
            except OSError:
                with lock:
                    done["errors"] += 1

    before = mib()
    start = time.monotonic()
    threads = [threading.Thread(target=accept_loop)] + [
        threading.Thread(target=client, args=(n,)) for n in range(args.threads)]
    for t in threads:
        t.start()
    samples: List[Dict[str, Any]] = []
    while time.monotonic() - start < args.duration:
        time.sleep(min(30.0, max(0.0, args.duration - (time.monotonic() - start))))
        if tel is not None:
            tel.points()  # an export, as a periodic reader would do
        gc.collect()
        samples.append({"t": round(time.monotonic() - start), **state()})
    stop.set()
    for t in threads[1:]:
        t.join()
    stop_accepting.set()
    threads[0].join()
    srv.close()
    settle(1.0, timeout=300)
    delta = mib_delta(before, mib())
    points = tel.points() if tel is not None else []
    gc.collect()
    memory = memory_verdict(samples)  # under the same load: the samples taken during the traffic
    memory["after_traffic"] = state()
    if hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)
        memory["rss_after_trim_kb"] = state()["rss_kb"]

    def total(name: str, **attrs: str) -> int:
        want = {k.replace("__", "."): v for k, v in attrs.items()}
        return sum(p["value"] for p in points
                   if p["name"] == name and all(p["attrs"].get(k) == v for k, v in want.items()))

    def count(name: str) -> int:  # a histogram's points
        return sum(p["count"] for p in points if p["name"] == name)

    lost_by_probe = {p["attrs"]["ebpf_flows.probe.name"]: p["value"] for p in points
                     if p["name"] == "ebpf_flows.probe.events.lost"}
    completed = sum(p["value"] for p in points
                    if p["name"] == "ebpf_flows.tcp.connection.attempts" and "error.type" not in p["attrs"])
    exported = {
        "handshake.points": count("ebpf_flows.tcp.handshake.duration"),
        "completed_attempts": completed,
        "duration.points": count("ebpf_flows.tcp.connection.duration"),
        "rtt.points": count("ebpf_flows.tcp.rtt"),
        "attempts.client": total("ebpf_flows.tcp.connection.attempts", ebpf_flows__tcp__role="client"),
        "attempts.server": total("ebpf_flows.tcp.connection.attempts", ebpf_flows__tcp__role="server"),
        "retransmits": total("ebpf_flows.tcp.retransmits"),
        "resets.transmit": total("ebpf_flows.tcp.resets", network__io__direction="transmit"),
        "closes": total("ebpf_flows.tcp.connection.closes"),
        "active": total("ebpf_flows.tcp.connections.active"),
        "events.lost": total("ebpf_flows.probe.events.lost"),
        "map.evictions": total("ebpf_flows.probe.map.evictions"),
        "events.lost.by_probe": {p["attrs"]["ebpf_flows.probe.name"]: p["value"] for p in points
                                 if p["name"] == "ebpf_flows.probe.events.lost" and p["value"]},
    }
    # PassiveOpens counts every socket the kernel created for a request; one it closed
    # before ESTABLISHED (the loser of two CPUs completing the same request) completed
    # no handshake. The probes count those too (a kernel-side statistic, not telemetry).
    discarded = child_sockets_discarded(tel) if tel is not None else 0
    kernel = {
        "attempts.client": delta["Tcp.ActiveOpens"],
        "attempts.server": delta["Tcp.PassiveOpens"] - discarded,
        "retransmits": delta["Tcp.RetransSegs"],
    }
    result = {
        "duration_s": round(time.monotonic() - start), "loss_percent": args.loss, "instrumented": tel is not None,
        "done": done, "exported": exported, "kernel": kernel,
        "passive_opens": delta["Tcp.PassiveOpens"], "children_discarded_before_established": discarded,
        "reconciled": {k: exported[k] == v for k, v in kernel.items()} if tel is not None else {},
        # every completed handshake has its point, or is counted as one whose start (syn_wait)
        # or whose handshake itself (unseen_handshake) no probe saw
        "handshakes_reconciled": exported["handshake.points"] + lost_by_probe.get("tcp_flows.syn_wait", 0)
        + lost_by_probe.get("tcp_flows.unseen_handshake", 0) == completed if tel is not None else None,
        "memory": memory, "samples": samples,
    }
    if spans is not None:
        # every span made a connection: each carries its handshake (unless its handshake went
        # unseen), none says reused; handshake exemplars name spans
        result["spans"] = {**spans.counts, "handshake_exemplars": sum(
            p.get("exemplars", 0) for p in points if p["name"] == "ebpf_flows.tcp.handshake.duration")}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
