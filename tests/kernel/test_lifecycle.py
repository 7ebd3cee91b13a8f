"""Lifecycle and integrity: repeated instrument()/uninstrument(), clean shutdown, a tampered object,
no tracefs, and nothing pinned or listening."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.kernel.conftest import ROOT, total


def test_instrument_uninstrument_many_times_leaks_nothing(run_scenario):
    r = run_scenario("lifecycle")
    base, states, warm = r["base"], r["states"], r["warmup"]
    during = r["during"]
    # while instrumented: programs, maps and links open; a reader thread
    assert during["prog"] > 0 and during["map"] > 0 and during["link"] > 0, during
    assert during["py_threads"] == base["py_threads"] + 1, (base, during)
    for i, s in enumerate(states):  # after every uninstrument(): back to exactly the start
        for key in ("prog", "map", "link", "fds", "threads", "py_threads"):
            assert s[key] == base[key], (i, key, base, s)
    # memory flat after warm-up: Python allocations within 256 KiB, RSS within 4 MiB over the cycles
    traced = r["traced"][warm:]
    assert max(traced) - traced[0] < 256 * 1024, r["traced"]
    rss = [s["rss_kb"] for s in states[warm:]]
    assert max(rss) - rss[0] < 4096, rss
    # every cycle counted its one connection (a new instrumentation counts from zero)
    assert r["attempts"] == [1] * len(states), r["attempts"]
    # nothing listening, nothing pinned: neither while instrumented nor after
    assert during["listening"] == r["listen_before"] == r["listen_after"], r
    assert during["pins"] == r["pins_before"] == r["pins_after"], r


def test_interpreter_exit_with_probes_attached_is_clean(kernel_ok):
    """The process exits normally without uninstrument(): status 0, nothing on stderr."""
    code = textwrap.dedent("""
        import socket, subprocess
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
        from otel_ebpf_flows import EbpfFlowsInstrumentor
        import io
        provider = MeterProvider(metric_readers=[PeriodicExportingMetricReader(
            ConsoleMetricExporter(out=io.StringIO()), export_interval_millis=50)])
        EbpfFlowsInstrumentor().instrument(meter_provider=provider)
        assert EbpfFlowsInstrumentor().pipeline is not None
        srv = socket.socket(); srv.bind(("127.0.0.1", 5590)); srv.listen()
        c = socket.create_connection(("127.0.0.1", 5590)); a, _ = srv.accept()
        c.sendall(b"x"); a.recv(1)
        print("done")
    """)
    proc = subprocess.run(["unshare", "--net", sys.executable, "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "done\n"
    assert proc.stderr == ""


def test_a_tampered_object_is_refused_and_nothing_is_loaded(run_scenario):
    r = run_scenario("tampered_object")
    # refused: instrument() falls back to sock_diag mode, which loads nothing into the kernel
    assert r["pipeline"] is True and r["variant"] == "sock_diag" and r["error"] is None, r
    warnings = [m for level, m in r["records"] if level == "WARNING"]
    assert len(warnings) == 1, r["records"]
    assert r["path"] in warnings[0] and "SHA-256" in warnings[0] and "reinstall" in warnings[0], warnings
    assert "runs in sock_diag mode because" in warnings[0], warnings
    # no program, map or link was ever opened; the one new descriptor is sock_diag mode's netlink socket
    assert r["after"] == {**r["before"], "fds": r["before"]["fds"] + 1}, r


def test_works_without_tracefs(run_scenario):
    r = run_scenario("no_tracefs")
    assert r["mounted"] == [], r["mounted"]  # really gone in this mount namespace
    assert not r["tracefs_dir"], r["tracefs_dir"]
    pts = r["points"]
    assert total(pts, "ebpf_flows.tcp.connection.attempts", ebpf_flows__tcp__role="client") == 3
    assert r["mib"]["Tcp.ActiveOpens"] == 3
    assert total(pts, "ebpf_flows.tcp.connection.closes") == 3


def test_the_shipped_object_is_world_readable_but_not_writable():
    path = os.path.join(ROOT, "otel_ebpf_flows", "bpf", "tcp_flows.bpf.o")
    mode = os.stat(path).st_mode
    assert not mode & 0o022, oct(mode)  # no group/other write: nobody else can swap it
