"""Helpers that run inside a test's private network namespace.

Ground truth here is the kernel's own: the namespace's MIB counters
(/proc/net/snmp, /proc/net/netstat) and getsockopt(TCP_INFO). Faults are made
with nftables inside the namespace.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource

TCPI_OPT_WSCALE = 4


def setup_netns(sysctls: Optional[Dict[str, str]] = None) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for name, value in (sysctls or {}).items():
        with open("/proc/sys/" + name.replace(".", "/"), "w") as f:
            f.write(value)


def nft(*rules: str) -> None:
    """Apply nft statements (one per argument) in this namespace."""
    script = "\n".join(rules) + "\n"
    subprocess.run(["nft", "-f", "-"], input=script.encode(), check=True)


def random_loss(port: int, percent: int) -> None:
    """Drop ``percent`` % of segments to and from ``port`` on input (so: lost, not send errors)."""
    nft(
        "add table inet loss",
        "add chain inet loss input { type filter hook input priority 0; }",
        f"add rule inet loss input tcp dport {port} numgen random mod 100 < {percent} counter drop",
        f"add rule inet loss input tcp sport {port} numgen random mod 100 < {percent} counter drop",
    )


def mib() -> Dict[str, int]:
    """The namespace's TCP MIB counters, as ``Tcp.X`` and ``TcpExt.X``."""
    out: Dict[str, int] = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        with open(path) as f:
            lines = f.read().splitlines()
        for head, vals in zip(lines[::2], lines[1::2]):
            prefix, names = head.split(":", 1)
            _, values = vals.split(":", 1)
            for n, v in zip(names.split(), values.split()):
                out[f"{prefix}.{n}"] = int(v)
    return out


def mib_delta(before: Dict[str, int], after: Dict[str, int]) -> Dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def tcp_info(sock: socket.socket) -> Dict[str, int]:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    (state, _ca, _retr, _probes, _backoff, options, wscale) = struct.unpack_from("7B", raw, 0)
    return {
        "state": state,
        "options": options,
        "rtt_us": struct.unpack_from("I", raw, 68)[0],
        "total_retrans": struct.unpack_from("I", raw, 100)[0],
        "bytes_acked": struct.unpack_from("Q", raw, 120)[0],
        "bytes_received": struct.unpack_from("Q", raw, 128)[0],
    }


class Telemetry:
    """This process instrumented on a real SDK MeterProvider with an in-memory reader."""

    def __init__(self, records: bool = False, **config: Any) -> None:
        """``records=True``: histogram points as ring-buffer records, not aggregated in the kernel
        (Views whose buckets are the library's plus a bound at 0: not the kernel's buckets; each
        point costs the reader what it did before the kernel aggregated them)."""
        from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

        from otel_ebpf_flows import EbpfFlowsInstrumentor
        from otel_ebpf_flows._telemetry import (
            DURATION,
            DURATION_BUCKETS,
            HANDSHAKE,
            HANDSHAKE_BUCKETS,
            RTT,
            RTT_BUCKETS,
        )

        self.reader = InMemoryMetricReader()
        extra: Dict[str, Any] = {}
        if records:
            extra["views"] = [View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation((0.0, *b)))
                              for name, b in ((HANDSHAKE, HANDSHAKE_BUCKETS), (DURATION, DURATION_BUCKETS),
                                              (RTT, RTT_BUCKETS))]
        self.provider = MeterProvider(
            metric_readers=[self.reader], resource=Resource.create({"service.name": "kernel-test"}), **extra
        )
        self.instrumentor = EbpfFlowsInstrumentor()
        self.instrumentor.instrument(meter_provider=self.provider, **config)
        if self.instrumentor.pipeline is None:
            raise RuntimeError("instrument() did not start: see the warning above")
        # the reader decides which histograms the kernel aggregates just after start: traffic
        # from here on meets the same mode throughout
        pipeline = self.instrumentor.pipeline
        deadline = time.monotonic() + 10
        while pipeline._hist_source is not None and pipeline._hist_mode is None and time.monotonic() < deadline:
            time.sleep(0.005)

    def points(self, refresh: bool = True) -> List[Dict[str, Any]]:
        # A sample taken now, after the scenario's traffic settled: a collection reads the
        # counter maps but runs no socket pass (live connections' bytes, RTT samples).
        # Two samples: a socket whose close the kernel never reported is found gone (and
        # counted, see KernelSource._sweep) by the second iterator pass that misses it.
        # refresh=False: just the collection, as an exporter's timer takes it.
        pipeline = self.instrumentor.pipeline
        if pipeline is not None and refresh:
            pipeline.refresh(timeout=60.0)
            time.sleep(pipeline.FRESH_S)
            pipeline.refresh(timeout=60.0)
        data = self.reader.get_metrics_data()
        out = []
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for p in m.data.data_points:
                        row: Dict[str, Any] = {"name": m.name, "attrs": dict(p.attributes)}
                        if hasattr(p, "bucket_counts"):
                            row.update(count=p.count, sum=p.sum, min=p.min, max=p.max,
                                       exemplars=len(p.exemplars or ()))
                        else:
                            row["value"] = p.value
                        out.append(row)
        return out

    def close(self) -> None:
        self.instrumentor.uninstrument()
        self.provider.shutdown()


def peer(*args: str, module: str = "tests.kernel.peer") -> subprocess.Popen:
    """Start an uninstrumented peer process (``python -m module args``) in this namespace."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "ready"
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"peer {args} did not start: {line!r}")
    return proc


def finish(proc: subprocess.Popen, timeout: float = 60) -> Any:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"peer exited {proc.returncode}: {out}")
    last = out.strip().splitlines()[-1] if out.strip() else "null"
    return json.loads(last)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed early")
        buf += chunk
    return bytes(buf)


def drain_until_eof(sock: socket.socket) -> int:
    total = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return total
        total += len(chunk)


def in_threads(fn: Callable[[int], Any], n: int) -> List[Any]:
    results: List[Any] = [None] * n
    errors: List[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = fn(i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


_QUIET_STATES = {"0A", "06", "07"}  # LISTEN, TIME_WAIT, CLOSE


def settle(seconds: float = 0.3, timeout: float = 60.0) -> None:
    """Wait until no TCP connection in this namespace is still open or closing, then ``seconds``.

    Under loss a FIN can still be in retransmission after the application closed
    its socket; counts are only final once every connection has reached CLOSE.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = []
        for path in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(path) as f:
                next(f)
                busy += [line.split()[1:4] for line in f if line.split()[3] not in _QUIET_STATES]
        if not busy:
            break
        time.sleep(0.05)
    else:
        raise TimeoutError(f"TCP connections in the test namespace did not close: {busy}")
    time.sleep(seconds)


def emit(result: Any) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown noise in the JSON channel
