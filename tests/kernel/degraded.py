"""Run by tests/kernel/test_degradation.py under a degraded condition (no privilege, no libbpf, ...).

python tests/kernel/degraded.py [--simulate tp_btf_refused|rdonly_cast_missing|tail_call_refused|not_linux|none]

In a network namespace whose loopback the caller brought up. Instruments this
process on a real SDK MeterProvider, makes 3 connections to its own listener,
and prints one JSON line: whether the instrumentation is on, every log record
of otel_ebpf_flows at WARNING or above, the exported attempts, the namespace's
MIB counters, and what ``doctor`` says. Nothing here needs root.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
from typing import List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--simulate", choices=["tp_btf_refused", "rdonly_cast_missing", "not_linux", "none",
                                          "verifier_interrupted_once", "verifier_interrupted",
                                          "tail_call_refused"])
    args = p.parse_args()
    if args.simulate == "not_linux":
        sys.platform = "darwin"  # before the package is imported: what it sees on macOS
    records = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append({"level": record.levelname, "logger": record.name, "message": record.getMessage()})

    logging.getLogger().addHandler(Keep(logging.WARNING))

    from otel_ebpf_flows import EbpfFlowsInstrumentor, _doctor, _libbpf
    from otel_ebpf_flows.exceptions import BpfError

    if args.simulate in ("tp_btf_refused", "rdonly_cast_missing"):
        # tp_btf_refused: the kernel refuses both tp_btf loads (with bpf_rdonly_cast, then
        # without), as kernels before 5.5 do; rdonly_cast_missing: only the first, as 5.5-6.1 do
        refused = 2 if args.simulate == "tp_btf_refused" else 1
        real_load = _libbpf.BpfObject.load
        calls = []

        def load(self: _libbpf.BpfObject) -> None:
            calls.append(1)
            if len(calls) <= refused:
                raise BpfError(f"the kernel refused to load tcp_flows.bpf.o (simulated: {args.simulate})", 22)
            real_load(self)

        _libbpf.BpfObject.load = load  # type: ignore[method-assign]

    if args.simulate == "tail_call_refused":
        # the kernel refusing a main program in its hook's program array (the nested copies
        # that tail-call it), as a kernel that does not allow it from tracing programs would
        real_update = _libbpf.Map.update
        refusals = []

        def update(self: _libbpf.Map, key: object, value: object, flags: int = _libbpf.BPF_ANY) -> None:
            if self.name.startswith("jump_"):
                refusals.append(self.name)
                raise BpfError(f"update of map {self.name} (simulated: tail call refused)", 22)
            real_update(self, key, value, flags)  # type: ignore[arg-type]

        _libbpf.Map.update = update  # type: ignore[assignment,method-assign]

    loads: List[str] = []  # the loads simulated as interrupted, and those after
    if args.simulate in ("verifier_interrupted_once", "verifier_interrupted"):
        # the verifier giving up on a pending signal (EAGAIN), as under a ptrace-based profiler
        # sampling fast (py-spy record --rate 250 or more): once, or at every load
        real_load = _libbpf.BpfObject.load

        def interrupted(self: _libbpf.BpfObject) -> None:
            loads.append(self.path)
            if args.simulate == "verifier_interrupted" or len(loads) == 1:
                raise BpfError("the kernel refused to load tcp_flows.bpf.o (simulated: a pending signal)", 11)
            real_load(self)

        _libbpf.BpfObject.load = interrupted  # type: ignore[method-assign]

    from tests.kernel.harness import Telemetry, mib, mib_delta, settle

    try:
        tel = Telemetry()
    except RuntimeError:
        tel = None
    pipeline = EbpfFlowsInstrumentor().pipeline
    loads_by_instrument = len(loads)  # not doctor's below
    before = mib()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]

    def serve() -> None:
        for _ in range(3):
            conn, _ = srv.accept()
            with conn:
                conn.sendall(conn.recv(16))

    t = threading.Thread(target=serve)
    t.start()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"degraded")
            c.recv(16)
    t.join()
    srv.close()
    settle()
    points = tel.points() if tel is not None else []
    attempts = {"client": 0, "server": 0}
    handshakes = {"client": 0, "server": 0}  # timed ones (the server's: the accept-queue walk)
    syn_wait_lost = 0
    for pt in points:
        if pt["name"] == "ebpf_flows.tcp.connection.attempts" and "error.type" not in pt["attrs"]:
            attempts[pt["attrs"]["ebpf_flows.tcp.role"]] += pt["value"]
        if pt["name"] == "ebpf_flows.tcp.handshake.duration":
            handshakes[pt["attrs"]["ebpf_flows.tcp.role"]] += pt["count"]
        if pt["name"] == "ebpf_flows.probe.events.lost" and \
                pt["attrs"].get("ebpf_flows.probe.name") == "tcp_flows.syn_wait":
            syn_wait_lost += pt["value"]
    logging.getLogger().handlers.clear()
    checks = _doctor.run_checks(load=True)
    print(json.dumps({
        "on": pipeline is not None,
        "variant": getattr(getattr(pipeline, "source", None), "variant", None),
        "attached": getattr(getattr(pipeline, "source", None), "attached", None),
        "records": records,
        "attempts": attempts,
        "handshakes": handshakes,
        "syn_wait_lost": syn_wait_lost,
        "mib": mib_delta(before, mib()),
        "doctor": {"will_work": _doctor.will_work(checks),
                   "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail, "fix": c.fix} for c in checks]},
        "uid": os.geteuid(),
        "loads": loads_by_instrument,
    }))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
