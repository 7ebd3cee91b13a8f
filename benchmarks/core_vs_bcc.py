#!/usr/bin/env python3
"""Start-up time and memory: the shipped CO-RE object (``instrument()``) vs the same probes compiled by BCC.

Measured for docs/core-vs-bcc.md; not run by CI. As root::

    apt-get install python3-bpfcc linux-headers-amd64   # BCC and the headers it compiles against
    python3 benchmarks/core_vs_bcc.py --runs 5           # prints a Markdown table (and --json FILE)

Each run is a fresh process, the two sides alternating:

- ``core``: the project's venv interpreter (``.venv/bin/python``) with the OpenTelemetry SDK
  imported; timed: ``import otel_ebpf_flows`` and ``EbpfFlowsInstrumentor().instrument()``
  (open, CO-RE relocate, verify, load, attach, adopt existing sockets, first sample).
- ``bcc``: Debian's ``/usr/bin/python3`` with ``python3-bpfcc``; timed: ``import bcc`` and
  ``BPF(text=...)`` (clang front end on the kernel headers, LLVM, load, and attach: BCC attaches
  ``TRACEPOINT_PROBE``s while constructing). The program (``BCC_PROGRAM`` below) has the same hooks
  as bpf/tcp_flows.bpf.c (classic tracepoints, as BCC attaches them), the same kinds of maps and
  reads the same ``tcp_sock`` fields; it is not a line-by-line port (no ``iter/tcp``: BCC's Python
  API cannot run BPF iterators).

RSS is VmRSS from /proc/self/status after ``gc.collect()``; peak is VmHWM. Both are measured
relative to the process's RSS just before the import.

The BCC run also checks what it read: a loopback connection sends a known payload, its
``tcp_sock.bytes_acked`` and ``srtt_us`` as BCC's program read them at close (offsets from the
headers) are compared with the kernel's own TCP_INFO. This machine's kernel has no headers of its
own; ``--headers`` (default: the newest /usr/src/linux-headers-*-common with its -amd64 half)
names the ones BCC borrows, merged into a temporary tree that ``BCC_KERNEL_SOURCE`` points at.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import platform
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAYLOAD = 100_000

BCC_PROGRAM = r"""
#include <uapi/linux/ptrace.h>
#include <net/sock.h>
#include <net/tcp.h>
#include <linux/tcp.h>

/* 6.18's tcp:tcp_send_reset/tcp_receive_reset formats have a field of this type, which the
 * borrowed 6.1 headers do not declare: without this line the program does not compile. */
enum sk_rst_reason { SK_RST_REASON_NOT_SPECIFIED };

#define SF_ESTABLISHED 1
#define SF_LISTENER 2
#define SF_PEER_ZERO 4
#define SF_OUR_ZERO 8

struct flow_key { u8 addr[16]; u16 port; u8 family; u8 role; };
struct flow_counters {
    u64 attempts_ok, attempts_failed, closed, retrans_segs, bytes_acked, bytes_received,
        resets_sent, resets_received, zero_window_rx, zero_window_tx, wscale_disabled;
};
struct sock_state {
    struct flow_key key; u32 flags; u32 srtt_us;
    u64 start_ns, established_ns, bytes_acked, bytes_received;
};
struct event {
    struct flow_key key; u16 sport; u16 kind; u32 srtt_us;
    u64 duration_ns, bytes_acked, bytes_received;
};

BPF_HASH(socks, u64, struct sock_state, 65536);
BPF_HASH(listeners, u16, u64, 1024);
BPF_HASH(flows, struct flow_key, struct flow_counters, 4096);
BPF_ARRAY(stats, u64, 5);
BPF_RINGBUF_OUTPUT(events, 64);

static inline bool ours(void) { return (bpf_get_current_pid_tgid() >> 32) == TARGET_TGID; }

static inline struct flow_counters *counters(struct flow_key *k) {
    struct flow_counters zero = {};
    struct flow_counters *c = flows.lookup(k);
    if (c) return c;
    flows.insert(k, &zero);
    return flows.lookup(k);
}

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != IPPROTO_TCP) return 0;
    u64 skp = (u64)args->skaddr;
    struct sock *sk = (struct sock *)args->skaddr;
    struct tcp_sock *tp = (struct tcp_sock *)sk;
    struct sock_state *st = socks.lookup(&skp);
    u64 now = bpf_ktime_get_ns();
    if (!st) {
        struct sock_state fresh = {};
        if (args->newstate == TCP_SYN_SENT && ours()) {
            fresh.key.role = 1;
            fresh.key.port = args->dport;
        } else if (args->newstate == TCP_LISTEN && ours()) {
            u16 port = args->sport;
            fresh.key.role = 2;
            fresh.key.port = port;
            fresh.flags = SF_LISTENER;
            listeners.update(&port, &skp);
        } else if (args->newstate == TCP_SYN_RECV) {
            u16 port = args->sport;
            if (!listeners.lookup(&port)) return 0;
            fresh.key.role = 2;
            fresh.key.port = port;
        } else {
            return 0;
        }
        fresh.key.family = args->family == AF_INET ? 4 : 6;
        __builtin_memcpy(fresh.key.addr, args->daddr_v6, 16);
        fresh.start_ns = now;
        socks.update(&skp, &fresh);
        return 0;
    }
    if (args->newstate == TCP_ESTABLISHED && !(st->flags & SF_ESTABLISHED)) {
        struct flow_counters *c = counters(&st->key);
        st->flags |= SF_ESTABLISHED;
        st->established_ns = now;
        st->srtt_us = tp->srtt_us >> 3;
        st->bytes_acked = tp->bytes_acked;
        st->bytes_received = tp->bytes_received;
        if (c) {
            __sync_fetch_and_add(&c->attempts_ok, 1);
            struct tcp_options_received opt = {};
            bpf_probe_read_kernel(&opt, sizeof(opt), &tp->rx_opt);
            if (!opt.wscale_ok) __sync_fetch_and_add(&c->wscale_disabled, 1);
        }
        return 0;
    }
    if (args->newstate != TCP_CLOSE) return 0;
    if (st->flags & SF_LISTENER) {
        u16 port = args->sport;
        listeners.delete(&port);
        socks.delete(&skp);
        return 0;
    }
    struct flow_counters *c = counters(&st->key);
    if (!(st->flags & SF_ESTABLISHED)) {
        if (c) __sync_fetch_and_add(&c->attempts_failed, 1);
        return 0;
    }
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    u64 acked = tp->bytes_acked, received = tp->bytes_received;
    if (c) {
        __sync_fetch_and_add(&c->closed, 1);
        __sync_fetch_and_add(&c->bytes_acked, acked - st->bytes_acked);
        __sync_fetch_and_add(&c->bytes_received, received - st->bytes_received);
    }
    if (e) {
        e->key = st->key;
        e->sport = args->sport;
        e->kind = 2;
        e->srtt_us = tp->srtt_us >> 3;
        e->duration_ns = now - st->established_ns;
        e->bytes_acked = acked;
        e->bytes_received = received;
        events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
    }
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_destroy_sock) {
    u64 skp = (u64)args->skaddr;
    socks.delete(&skp);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb) {
    u64 skp = (u64)args->skaddr;
    struct sock_state *st = socks.lookup(&skp);
    struct sk_buff *skb = (struct sk_buff *)args->skbaddr;
    struct tcp_skb_cb *cb = (struct tcp_skb_cb *)&skb->cb[0];
    u16 segs = cb->tcp_gso_segs;
    if (!st) return 0;
    struct flow_counters *c = counters(&st->key);
    if (c) __sync_fetch_and_add(&c->retrans_segs, segs ? segs : 1);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_synack) {
    u64 skp = (u64)args->skaddr;
    struct sock_state *st = socks.lookup(&skp);
    if (!st) return 0;
    struct flow_counters *c = counters(&st->key);
    if (c) __sync_fetch_and_add(&c->retrans_segs, 1);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_send_reset) {
    u64 skp = (u64)args->skaddr;
    struct sock_state *st = socks.lookup(&skp);
    if (!st) return 0;
    struct flow_counters *c = counters(&st->key);
    if (c) __sync_fetch_and_add(&c->resets_sent, 1);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_receive_reset) {
    u64 skp = (u64)args->skaddr;
    struct sock_state *st = socks.lookup(&skp);
    if (!st) return 0;
    struct flow_counters *c = counters(&st->key);
    if (c) __sync_fetch_and_add(&c->resets_received, 1);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_probe) {
    u64 skp = (u64)args->skaddr;
    struct sock_state *st = socks.lookup(&skp);
    struct tcp_sock *tp = (struct tcp_sock *)args->skaddr;
    if (!st) return 0;
    struct flow_counters *c = counters(&st->key);
    if (!c) return 0;
    if (args->snd_wnd == 0) {
        if (!(st->flags & SF_PEER_ZERO)) { st->flags |= SF_PEER_ZERO; __sync_fetch_and_add(&c->zero_window_rx, 1); }
    } else {
        st->flags &= ~SF_PEER_ZERO;
    }
    if (tp->rcv_wnd == 0) {
        if (!(st->flags & SF_OUR_ZERO)) { st->flags |= SF_OUR_ZERO; __sync_fetch_and_add(&c->zero_window_tx, 1); }
    } else {
        st->flags &= ~SF_OUR_ZERO;
    }
    return 0;
}
"""


# -- measuring inside one process ------------------------------------------------------------


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def emit(record: Dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def worker_core() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    gc.collect()
    rss0 = status_kb("VmRSS")
    hwm0 = status_kb("VmHWM")
    t0 = time.perf_counter()
    from otel_ebpf_flows import EbpfFlowsInstrumentor

    t1 = time.perf_counter()
    gc.collect()
    rss1 = status_kb("VmRSS")
    instrumentor = EbpfFlowsInstrumentor()
    t2 = time.perf_counter()
    instrumentor.instrument(meter_provider=provider)
    t3 = time.perf_counter()
    if instrumentor.pipeline is None:
        raise SystemExit("instrument() did not start (see the warning above)")
    gc.collect()
    rss2 = status_kb("VmRSS")
    emit({"side": "core", "import_ms": (t1 - t0) * 1e3, "attach_ms": (t3 - t2) * 1e3,
          "total_ms": (t1 - t0 + t3 - t2) * 1e3, "rss_import_kb": rss1 - rss0, "rss_attach_kb": rss2 - rss1,
          "rss_total_kb": rss2 - rss0, "peak_kb": status_kb("VmHWM") - max(rss0, 0), "hwm_before_kb": hwm0,
          "variant": getattr(instrumentor.pipeline.source, "variant", "?"),
          "programs": len(getattr(instrumentor.pipeline.source, "attached", []))})
    instrumentor.uninstrument()
    provider.shutdown()


def _tcp_info(sock: socket.socket) -> Dict[str, int]:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    return {"rtt_us": struct.unpack_from("I", raw, 68)[0], "bytes_acked": struct.unpack_from("Q", raw, 120)[0],
            "bytes_received": struct.unpack_from("Q", raw, 128)[0]}


def _one_connection() -> Dict[str, int]:
    """A loopback connection: send PAYLOAD, wait until all is acknowledged, read TCP_INFO, close."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    received = bytearray()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                received.extend(chunk)

    server = threading.Thread(target=serve)
    server.start()
    client = socket.create_connection(listener.getsockname())
    client.sendall(b"z" * PAYLOAD)
    deadline = time.monotonic() + 5
    while _tcp_info(client)["bytes_acked"] < PAYLOAD + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    info = _tcp_info(client)
    info["sport"] = client.getsockname()[1]
    client.close()
    server.join(10)
    listener.close()
    return info


def worker_bcc(headers: str) -> None:
    os.environ["BCC_KERNEL_SOURCE"] = headers
    gc.collect()
    rss0 = status_kb("VmRSS")
    t0 = time.perf_counter()
    from bcc import BPF  # type: ignore[import-not-found]

    t1 = time.perf_counter()
    gc.collect()
    rss1 = status_kb("VmRSS")
    t2 = time.perf_counter()
    bpf = BPF(text=BCC_PROGRAM, cflags=[f"-DTARGET_TGID={os.getpid()}", "-Wno-macro-redefined"])
    t3 = time.perf_counter()
    gc.collect()
    rss2 = status_kb("VmRSS")
    record: Dict[str, Any] = {
        "side": "bcc", "import_ms": (t1 - t0) * 1e3, "attach_ms": (t3 - t2) * 1e3, "total_ms": (t3 - t0) * 1e3,
        "rss_import_kb": rss1 - rss0, "rss_attach_kb": rss2 - rss1, "rss_total_kb": rss2 - rss0,
        "peak_kb": status_kb("VmHWM") - rss0, "programs": bpf.num_open_tracepoints(),
    }
    # what it read: one connection's close, against TCP_INFO
    seen: List[Dict[str, int]] = []

    def on_event(_ctx: Any, data: Any, size: int) -> None:
        import ctypes

        # struct event: flow_key (20 bytes), u16 sport, u16 kind, u32 srtt_us, pad, u64 x 3
        sport, _kind, srtt_us, _duration, acked, received = struct.unpack_from(
            "=HHI4xQQQ", ctypes.string_at(data, size), 20)
        seen.append({"sport": sport, "srtt_us": srtt_us, "bytes_acked": acked, "bytes_received": received})

    bpf["events"].open_ring_buffer(on_event)
    info = _one_connection()
    time.sleep(0.2)
    bpf.ring_buffer_consume()
    mine = [s for s in seen if s["sport"] == info["sport"]]
    record["check"] = {"tcp_info": info, "bcc_read": mine[0] if mine else None}
    emit(record)
    bpf.cleanup()


# -- the driver ------------------------------------------------------------------------------


def merged_headers(spec: Optional[str], workdir: str) -> str:
    """A tree BCC can compile against: the -common half overlaid with the arch half (symlinks)."""
    if spec:
        commons = [spec]
    else:
        commons = sorted(glob.glob("/usr/src/linux-headers-*-common"),
                         key=lambda p: [int(x) for x in re.findall(r"\d+", p)])
    if not commons:
        raise SystemExit("no kernel headers: apt-get install linux-headers-amd64 (or pass --headers)")
    common = commons[-1]
    arch = common[: -len("-common")] + "-amd64"
    if not os.path.isdir(arch):
        raise SystemExit(f"{arch} is missing (the arch half of {common})")
    tree = os.path.join(workdir, "headers")
    subprocess.run(["cp", "-rs", common + "/.", tree + "/"], check=True)
    subprocess.run(["cp", "-rsf", arch + "/.", tree + "/"], check=True)
    return tree


def run_worker(python: str, args: List[str], timeout: float) -> Dict[str, Any]:
    proc = subprocess.run([python, os.path.abspath(__file__), *args], capture_output=True, text=True,
                          timeout=timeout, cwd="/")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{python} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return dict(json.loads(lines[-1]))


def fmt(values: List[float], unit: str, scale: float = 1.0, digits: int = 0) -> str:
    xs = [v * scale for v in values]
    return (f"{statistics.median(xs):,.{digits}f} {unit} (min {min(xs):,.{digits}f}, max {max(xs):,.{digits}f})")


def package_size_mb(names: List[str]) -> Optional[float]:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Installed-Size}\n", *names],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum(int(x) for x in out.split()) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="compare", choices=["compare", "worker-core", "worker-bcc"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--headers", help="a linux-headers-*-common directory (default: the newest installed)")
    parser.add_argument("--core-python", default=os.path.join(ROOT, ".venv", "bin", "python"))
    parser.add_argument("--bcc-python", default="/usr/bin/python3")
    parser.add_argument("--json", help="also write every run's record to this file")
    args = parser.parse_args()

    if args.mode == "worker-core":
        worker_core()
        return 0
    if args.mode == "worker-bcc":
        worker_bcc(args.headers or "")
        return 0

    if os.geteuid() != 0:
        raise SystemExit("run as root: both sides load BPF programs")
    workdir = tempfile.mkdtemp(prefix="core-vs-bcc-")
    try:
        tree = merged_headers(args.headers, workdir)
        core: List[Dict[str, Any]] = []
        bcc: List[Dict[str, Any]] = []
        for i in range(args.runs):
            core.append(run_worker(args.core_python, ["worker-core"], 120))
            bcc.append(run_worker(args.bcc_python, ["worker-bcc", "--headers", tree], 300))
            print(f"run {i + 1}/{args.runs}: core {core[-1]['total_ms']:.0f} ms, bcc {bcc[-1]['total_ms']:.0f} ms",
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"core": core, "bcc": bcc}, f, indent=1)

    def col(rows: List[Dict[str, Any]], key: str) -> List[float]:
        return [float(r[key]) for r in rows]

    kernel = platform.release()
    cpus = os.cpu_count()
    print(f"- **Date**: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"- **Machine**: {cpus} vCPUs, Linux {kernel}, {args.runs} runs per side (fresh process each, alternating)")
    common = args.headers or sorted(glob.glob("/usr/src/linux-headers-*-common"))[-1]
    print(f"- **Command**: `python3 benchmarks/core_vs_bcc.py --runs {args.runs}`; BCC compiled against the "
          f"borrowed headers `{os.path.basename(common)}` (this kernel has none of its own)")
    print()
    print("| measure (median, min–max) | CO-RE: otel-ebpf-flows | BCC |")
    print("|---|---|---|")
    print(f"| import (`otel_ebpf_flows` / `bcc`) | {fmt(col(core, 'import_ms'), 'ms')} | "
          f"{fmt(col(bcc, 'import_ms'), 'ms')} |")
    print(f"| load + attach (`instrument()` / `BPF(text=…)`) | {fmt(col(core, 'attach_ms'), 'ms')} | "
          f"{fmt(col(bcc, 'attach_ms'), 'ms')} |")
    print(f"| import + attach | {fmt(col(core, 'total_ms'), 'ms')} | {fmt(col(bcc, 'total_ms'), 'ms')} |")
    print(f"| RSS added by the import | {fmt(col(core, 'rss_import_kb'), 'MB', 1 / 1024, 1)} | "
          f"{fmt(col(bcc, 'rss_import_kb'), 'MB', 1 / 1024, 1)} |")
    print(f"| RSS added by load + attach | {fmt(col(core, 'rss_attach_kb'), 'MB', 1 / 1024, 1)} | "
          f"{fmt(col(bcc, 'rss_attach_kb'), 'MB', 1 / 1024, 1)} |")
    print(f"| RSS added in all, after gc | {fmt(col(core, 'rss_total_kb'), 'MB', 1 / 1024, 1)} | "
          f"{fmt(col(bcc, 'rss_total_kb'), 'MB', 1 / 1024, 1)} |")
    print(f"| peak RSS above the start (VmHWM) | {fmt(col(core, 'peak_kb'), 'MB', 1 / 1024, 1)} | "
          f"{fmt(col(bcc, 'peak_kb'), 'MB', 1 / 1024, 1)} |")
    print(f"| programs attached | {core[0]['programs']} ({core[0]['variant']}) + iter/tcp | {bcc[0]['programs']} "
          "(classic tracepoints) |")
    bcc_pkgs = package_size_mb(["libbpfcc", "python3-bpfcc", "libclang-cpp14", "libllvm14"])
    hdr = sum(os.path.getsize(os.path.join(d, f)) for root in glob.glob("/usr/src/linux-headers-*")
              for d, _, fs in os.walk(root) for f in fs if not os.path.islink(os.path.join(d, f))) / 2**20
    obj = os.path.getsize(os.path.join(ROOT, "otel_ebpf_flows", "bpf", "tcp_flows.bpf.o")) / 1024
    print(f"| on disk, beyond Python | `tcp_flows.bpf.o` {obj:.0f} KB + system libbpf | "
          f"{bcc_pkgs or 0:.0f} MB of packages (libbpfcc, LLVM/clang 14) + {hdr:.0f} MB of kernel headers |")
    checks = [r["check"] for r in bcc]
    right = [c for c in checks if c["bcc_read"] and abs(c["bcc_read"]["bytes_acked"] - c["tcp_info"]["bytes_acked"]) <= 1
             and c["bcc_read"]["srtt_us"] <= 4 * c["tcp_info"]["rtt_us"] + 100]
    read = [c["bcc_read"] for c in checks if c["bcc_read"]]
    truth = checks[0]["tcp_info"]
    wrong = ""
    if read:
        wrong = (f": `srtt_us` read as {min(r['srtt_us'] for r in read) / 1e6:,.0f}–"
                 f"{max(r['srtt_us'] for r in read) / 1e6:,.0f} s, `bytes_acked` as "
                 f"{min(r['bytes_acked'] for r in read):.2e}–{max(r['bytes_acked'] for r in read):.2e} "
                 f"(TCP_INFO: {truth['rtt_us']} µs, {truth['bytes_acked']:,})")
    print(f"| `tcp_sock.srtt_us` and `bytes_acked` of a {PAYLOAD:,}-byte loopback connection, read at close, "
          f"agree with TCP_INFO | yes (asserted exactly by tests/kernel) | {len(right)} of {len(checks)} runs{wrong} |")
    print()
    print("Every run's record: `--json FILE`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
