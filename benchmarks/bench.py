"""Overhead and scale benchmarks of otel-ebpf-flows; results go into benchmarks/README.md.

Run through ``benchmarks/run`` (which picks the interpreter). As root, on the machine
you want figures for. Scenarios, in order:

1. cost     per-program run time (kernel.bpf_stats_enabled=1) under loopback load, for
            an idle instrumented process (other processes' traffic) and for the
            instrumented process's own traffic, next to calibration programs
2. tax      host tax: a native load generator in a private network namespace, ops/s
            with nothing, with an idle instrumented process, and with tcplife running
3. startup  wall time of instrument() and the RSS it adds
4. inproc   a Python service instrumented vs not: throughput and p99 latency
5. reader   reader-thread CPU at ~1k connections/s, and collection times with 1k and
            10k live connections

Every background process is stopped and kernel.bpf_stats_enabled restored, also on
error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from workers import prog_stats, stats_delta  # benchmarks/workers.py, next to this file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
README = HERE / "README.md"
BEGIN = "<!-- results:begin (written by benchmarks/run: edit outside these markers) -->"
END = "<!-- results:end -->"
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
NETNS_SH = 'ip link set lo up && exec "$0" "$@"'

COST_TARGET_NS = 150
# Programs held to COST_TARGET_NS: per segment, per state change, per send and receive (span
# enrichment, on by default), per connection.
HOT_PATHS = (("probe", "per received segment"), ("set_state", "per TCP state change"),
             ("send_length", "per send (span enrichment)"), ("recv_length", "per receive (span enrichment)"),
             ("destroy_sock", "per connection destroyed"))
TAX_TARGETS = {"churn": 0.98, "rr": 0.99}
STARTUP_TARGET_MS = 100
STARTUP_TARGET_MB = 10
INPROC_TPUT_TARGET = 0.97
INPROC_P99_TARGET = 1.05
READER_CPU_TARGET_PCT = 1.0
COLLECT_TARGET_MS = 2.0

WORKLOAD_NAMES = {"churn": "connect/request/response/close", "rr": "request/response, one connection",
                  "bulk": "bulk transfer, one connection"}


@dataclass
class Plan:
    cost_reps: int
    cost_seconds: Dict[str, float]
    tax_reps: int
    tax_seconds: float
    startup_reps: int
    inproc_reps: int
    inproc_seconds: float
    reader_reps: int
    reader_seconds: float
    collections: int
    span_reps: int = 3  # alternating pairs of the span-end worker (scenario 5)


FULL = Plan(cost_reps=3, cost_seconds={"churn": 2, "rr": 1, "bulk": 1}, tax_reps=9, tax_seconds=2,
            startup_reps=7, inproc_reps=6, inproc_seconds=3, reader_reps=2, reader_seconds=10, collections=12)
QUICK = Plan(cost_reps=1, cost_seconds={"churn": 1, "rr": 0.5, "bulk": 0.5}, tax_reps=3, tax_seconds=1.2,
             startup_reps=3, inproc_reps=2, inproc_seconds=1.2, reader_reps=1, reader_seconds=5, collections=6)


@dataclass
class Row:
    scenario: str
    measure: str
    figure: str
    target: str
    verdict: str  # MET, NOT MET, info, NOT MEASURED


@dataclass
class Report:
    rows: List[Row] = field(default_factory=list)
    sections: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def check(self, scenario: str, measure: str, figure: str, target: str, ok: bool) -> None:
        self.rows.append(Row(scenario, measure, figure, target, "MET" if ok else "NOT MET"))

    def info(self, scenario: str, measure: str, figure: str) -> None:
        self.rows.append(Row(scenario, measure, figure, "—", "info"))


def log(msg: str) -> None:
    print(f"== bench: {msg}", file=sys.stderr, flush=True)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: Sequence[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(min(xs))}–{fmt.format(max(xs))}"


# -- processes --------------------------------------------------------------------------


class Children:
    """Every background process this run starts, so that all of them are stopped."""

    def __init__(self) -> None:
        self.procs: List[subprocess.Popen[Any]] = []

    def start(self, argv: List[str], **kw: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(argv, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], sig: Optional[int] = None, timeout: float = 10) -> None:
        """Close its stdin (a worker leaves then), send ``sig`` if given, wait; kill it after ``timeout``."""
        if proc.stdin is not None and not proc.stdin.closed:
            try:
                proc.stdin.close()
            except OSError:
                pass
        if sig is not None and proc.poll() is None:
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc, signal.SIGTERM, timeout=5)


CHILDREN = Children()


class Env:
    """Tools, interpreter and build products of this run."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.python = sys.executable
        self.child_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        self.child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.loadgen = workdir / "loadgen"
        self.calib: Optional[Path] = None
        self.tcplife = shutil.which("tcplife") or ("/usr/sbin/tcplife" if os.access("/usr/sbin/tcplife", os.X_OK) else None)

    def build(self) -> None:
        clang = shutil.which("clang") or shutil.which("clang-14")
        cc = shutil.which("gcc") or clang or "cc"
        subprocess.run([cc, "-O2", "-Wall", "-pthread", "-o", str(self.loadgen), str(HERE / "loadgen.c")], check=True)
        if clang is None:
            log("no clang: the calibration programs are skipped")
            return
        arch = {"x86_64": "x86", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
        out = self.workdir / "calib.bpf.o"
        try:
            subprocess.run([clang, "-O2", "-g", "-target", "bpf", f"-D__TARGET_ARCH_{arch}", f"-I{ROOT / 'bpf'}",
                            "-c", str(HERE / "calib.bpf.c"), "-o", str(out)], check=True)
            self.calib = out
        except subprocess.CalledProcessError:
            log("the calibration programs did not compile: skipped")

    def worker(self, *args: str) -> List[str]:
        return [self.python, str(HERE / "workers.py"), *args]

    def in_netns(self, argv: List[str]) -> List[str]:
        return ["unshare", "--net", "--", "sh", "-c", NETNS_SH, *argv]

    def run_json(self, argv: List[str], timeout: float) -> List[Dict[str, Any]]:
        out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=timeout, env=self.child_env)
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

    def loadgen_run(self, mode: str, seconds: float, threads: int = 2) -> Dict[str, Any]:
        """One load generator run; adds ``cpu_s``, the CPU time it used (kernel work on its behalf included)."""
        argv = self.in_netns([str(self.loadgen), mode, "-t", str(threads), "-d", str(seconds)])
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = self.run_json(argv, timeout=seconds + 30)[-1]
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result["cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return result

    def start_idle(self, calibrate: bool = False) -> Tuple[subprocess.Popen[Any], Dict[str, Any]]:
        args = ["idle"] + (["--calibrate", str(self.calib)] if calibrate and self.calib else [])
        proc = CHILDREN.start(self.worker(*args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=self.child_env)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("{"):
            CHILDREN.stop(proc)
            raise RuntimeError(f"the idle instrumented process did not start (exit {proc.returncode})")
        return proc, json.loads(line)

    def start_tcplife(self) -> Tuple[subprocess.Popen[Any], Path]:
        if self.tcplife is None:
            raise RuntimeError("tcplife not found (apt-get install libbpf-tools)")
        out = self.workdir / "tcplife.out"
        with open(out, "w") as f:
            # Line-buffered, as on a terminal; stdout to a file that is read after.
            proc = CHILDREN.start(["stdbuf", "-oL", self.tcplife], stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while out.stat().st_size == 0:  # the header comes once the programs are attached
            if proc.poll() is not None or time.monotonic() > deadline:
                CHILDREN.stop(proc, signal.SIGINT)
                raise RuntimeError(f"tcplife did not start: {out.read_text()[:300]}")
            time.sleep(0.05)
        return proc, out


class KernelStats:
    """Sets kernel.bpf_stats_enabled for a while; the original value comes back in restore()."""

    def __init__(self) -> None:
        self.original = BPF_STATS.read_text().strip()

    def set(self, on: bool) -> None:
        BPF_STATS.write_text("1" if on else "0")

    def is_on(self) -> bool:
        """Whether accounting is still on (another process may switch it off: it is host-wide)."""
        return BPF_STATS.read_text().strip() == "1"

    def restore(self) -> None:
        BPF_STATS.write_text(self.original)


# -- 1. per-program cost ---------------------------------------------------------------


Cells = Dict[str, Dict[str, Dict[str, int]]]  # program name -> workload -> run_cnt, run_time_ns


def accumulate(acc: Cells, workload: str, delta: Dict[str, Dict[str, int]]) -> None:
    for name, c in delta.items():
        cell = acc.setdefault(name, {}).setdefault(workload, {"run_cnt": 0, "run_time_ns": 0})
        cell["run_cnt"] += c["run_cnt"]
        cell["run_time_ns"] += c["run_time_ns"]


def avg_ns(cells: Dict[str, Dict[str, int]], workloads: Sequence[str]) -> Tuple[int, Optional[float]]:
    cnt = sum(cells.get(w, {}).get("run_cnt", 0) for w in workloads)
    ns = sum(cells.get(w, {}).get("run_time_ns", 0) for w in workloads)
    return cnt, (ns / cnt if cnt else None)


def fmt_lost(lost: Dict[str, int]) -> str:
    """ebpf_flows.probe.events.lost by probe name, without the zeros."""
    shown = [f"{name.replace('tcp_flows.', '')} {n:,}" for name, n in sorted(lost.items()) if n]
    return " + ".join(shown) or "0"


def fmt_ns(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:.0f}"


def scenario_cost(env: Env, plan: Plan, stats: KernelStats, report: Report) -> None:
    workloads = list(plan.cost_seconds)
    stats.set(True)
    switched_off: List[str] = []  # measurements during which someone else turned accounting off
    try:
        host: Cells = {}
        per_rep: Dict[str, List[float]] = {}  # program name -> its average in each repetition
        load_cpu: Dict[str, float] = {}  # CPU seconds the load generator used, per workload
        proc, ready = env.start_idle(calibrate=True)
        variant = ready["variant"]
        try:
            for _ in range(plan.cost_reps):
                rep: Cells = {}
                for w in workloads:
                    before = prog_stats(ready["prog_ids"])
                    result = env.loadgen_run(w, plan.cost_seconds[w])
                    if not stats.is_on():  # flagged, not switched back: that would tax the other run
                        switched_off.append(f"host load, {w}")
                    delta = stats_delta(before, prog_stats(ready["prog_ids"]))
                    accumulate(rep, w, delta)
                    accumulate(host, w, delta)
                    load_cpu[w] = load_cpu.get(w, 0.0) + result["cpu_s"]
                for name, cells in rep.items():
                    _, a = avg_ns(cells, workloads)
                    if a is not None:
                        per_rep.setdefault(name, []).append(a)
        finally:
            CHILDREN.stop(proc)
        own: Cells = {}
        own_secs = plan.cost_seconds["churn"]
        for result in env.run_json(env.in_netns(env.worker("inproc", ",".join(workloads), "--instrument", "--bpf-stats",
                                                           "--tracer-provider",  # as the idle process: span programs on
                                                           "--duration", str(own_secs))), timeout=120):
            accumulate(own, result["mode"], result["bpf"])
        if not stats.is_on():
            switched_off.append("own traffic")
        own_spans: Cells = {}  # the same, every op a CLIENT span: what the span programs cost while spans are open
        for result in env.run_json(env.in_netns(env.worker("inproc", ",".join(workloads), "--instrument", "--bpf-stats",
                                                           "--spans", "--duration", str(own_secs))), timeout=120):
            accumulate(own_spans, result["mode"], result["bpf"])
        if not stats.is_on():
            switched_off.append("own traffic, every op a span")
    finally:
        stats.set(False)
    if switched_off:
        report.notes.append(
            "kernel.bpf_stats_enabled was switched off by another process during scenario 1 ("
            + ", ".join(switched_off) + "): run_time_ns and run_cnt stopped there, so those figures cover "
            "only part of their load (or none: \"no runs\"). Accounting is host-wide; another benchmark "
            "run on the machine is the usual cause.")

    for hook, what in HOT_PATHS:
        name = f"{variant}_{hook}"
        if name not in host and f"{name}_nocast" in host:  # a kernel without bpf_rdonly_cast
            name += "_nocast"
        for label, data, spread_of in (("other processes' traffic", host, per_rep),
                                       ("its own traffic (a tracer provider, no span open)", own, {}),
                                       ("its own traffic, every op a span", own_spans, {})):
            cnt, a = avg_ns(data.get(name, {}), workloads)
            extra = f" (reps {spread(spread_of[name])})" if len(spread_of.get(name, [])) > 1 else ""
            if a is None:
                report.rows.append(Row("1 cost", f"`{name}` {what}, {label}", "no runs", f"≤ {COST_TARGET_NS} ns",
                                       "NOT MEASURED"))
            else:
                report.check("1 cost", f"`{name}` {what}, {label}", f"{a:.0f} ns avg over {cnt:,} runs{extra}",
                             f"≤ {COST_TARGET_NS} ns", a <= COST_TARGET_NS)

    ours = [n for n in host if not n.startswith("calib_")]
    io = [n for n in ours if n.endswith(("_send_length", "_recv_length"))]

    def share(names: List[str]) -> str:
        """CPU time of these programs over the load's own CPU time, per workload."""
        parts = []
        for w in workloads:
            if load_cpu.get(w):
                ns = sum(host[n].get(w, {}).get("run_time_ns", 0) for n in names)
                parts.append(f"{w} {100 * ns / 1e9 / load_cpu[w]:.1f} %")
        return "; ".join(parts)

    report.info("1 cost", "the idle instrumented process's programs (span enrichment on), in CPU time, as a share "
                "of the load's own CPU time (a noise-free estimate of the host tax)", share(ours))
    if io:
        report.info("1 cost", "of which span enrichment's send/receive programs (`sock_send_length`, "
                    "`sock_recv_length`: every send and receive on the host)", share(io))
    elif not ready.get("tracks_threads"):
        report.rows.append(Row("1 cost", "span enrichment's send/receive programs", "not attached in the idle "
                               "process (kernel without sock_send_length?)", "—", "NOT MEASURED"))

    lines = [
        "### 1. Per-program cost (run_time_ns / run_cnt, kernel.bpf_stats_enabled=1)",
        "",
        f"*Host load*: an idle instrumented process while the native load generator runs in another network "
        f"namespace ({plan.cost_reps} rep(s) of {', '.join(f'{w} {s:g} s' for w, s in plan.cost_seconds.items())}): "
        "the cost every TCP event on the host pays. The idle process runs as users would: a tracer provider and "
        "span enrichment on, so `sock_send_length`/`sock_recv_length` run on every send and receive of the host. "
        "*Own traffic*: the instrumented Python process drives "
        f"the same workloads itself ({own_secs:g} s each), with a tracer provider and no span open (the "
        "results table also has the hot paths with every op a span, where the send/receive programs note "
        "which thread used which connection). `calib_*` are reference programs on the same hooks "
        "(benchmarks/calib.bpf.c): empty; one hash-map lookup keyed by the socket pointer; the same question asked "
        "of socket-local storage, and of a counting filter (one load from a global array, what the library's "
        "programs now ask first); three fields read with `bpf_probe_read_kernel` vs read directly. They are "
        "attached after the library's programs and run with warmer caches: read them as lower bounds.",
        "",
        "| program | host load: runs | churn ns | rr ns | bulk ns | all ns | own traffic: runs | churn ns | rr ns "
        "| bulk ns | all ns |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name in sorted(set(host) | set(own), key=lambda n: (n.startswith("calib"), n)):
        h, o = host.get(name, {}), own.get(name, {})
        hc, ha = avg_ns(h, workloads)
        oc, oa = avg_ns(o, workloads)
        if not hc and not oc:
            continue
        cols = [f"`{name}`", f"{hc:,}"] + [fmt_ns(avg_ns(h, [w])[1]) for w in workloads] + [fmt_ns(ha)]
        cols += [f"{oc:,}" if name in own else "—"] + [fmt_ns(avg_ns(o, [w])[1]) for w in workloads] + [fmt_ns(oa)]
        lines.append("| " + " | ".join(cols) + " |")
    lines.append("")
    lines.append("Programs with no runs in either column (retransmits, resets, synack retransmits) are left out.")
    report.sections.append("\n".join(lines))


# -- 2. host tax -----------------------------------------------------------------------


def scenario_tax(env: Env, plan: Plan, stats: KernelStats, report: Report) -> None:
    configs = ["baseline", "instrumented", "tcplife"]
    workloads = ["churn", "rr"]
    # ops/s per configuration, workload and repetition (None: that configuration could not run)
    ops: Dict[str, Dict[str, List[Optional[float]]]] = {c: {w: [] for w in workloads} for c in configs}
    order_log: List[str] = []
    tcplife_error = None
    for rep in range(plan.tax_reps):
        order = configs[rep % 3:] + configs[:rep % 3]
        order_log.append(" → ".join(order))
        for config in order:
            proc: Optional[subprocess.Popen[Any]] = None
            try:
                if config == "instrumented":
                    proc, _ = env.start_idle()
                elif config == "tcplife":
                    try:
                        proc, _ = env.start_tcplife()
                    except RuntimeError as exc:
                        tcplife_error = str(exc)
                        for w in workloads:
                            ops[config][w].append(None)
                        continue
                time.sleep(0.2)
                for w in workloads:
                    ops[config][w].append(env.loadgen_run(w, plan.tax_seconds)["ops_per_s"])
            finally:
                if proc is not None:
                    CHILDREN.stop(proc, signal.SIGINT if config == "tcplife" else None)
        log(f"tax rep {rep + 1}/{plan.tax_reps} done")

    def ratios(config: str, w: str) -> List[float]:
        """Each repetition's ops/s over the same repetition's baseline (seconds apart)."""
        return [x / b for x, b in zip(ops[config][w], ops["baseline"][w]) if x is not None and b]

    for w in workloads:
        target = TAX_TARGETS[w]
        r = ratios("instrumented", w)
        report.check("2 host tax", f"{WORKLOAD_NAMES[w]}: instrumented / baseline ops/s (median of per-rep ratios)",
                     f"{median(r):.3f} (reps {spread(r, '{:.2f}')})", f"≥ {target}", median(r) >= target)
        t = ratios("tcplife", w)
        if t:
            report.info("2 host tax", f"{WORKLOAD_NAMES[w]}: tcplife / baseline ops/s (reference)",
                        f"{median(t):.3f} (reps {spread(t, '{:.2f}')})")
    if tcplife_error:
        report.rows.append(Row("2 host tax", "tcplife reference", tcplife_error, "—", "NOT MEASURED"))

    lines = [
        "### 2. Host tax: every repetition (ops/s)",
        "",
        f"Native load generator (benchmarks/loadgen.c, 2 client + 2 server threads) in a fresh network namespace, "
        f"{plan.tax_seconds:g} s per run. *instrumented*: an idle instrumented Python process on the host; *tcplife*: "
        f"`stdbuf -oL tcplife > file` instead. The configurations rotate inside each repetition "
        f"({'; '.join(order_log[:3])}; …); the verdict uses each repetition's ratio to its own baseline, which "
        "cancels slow drift from other work on the machine.",
        "",
        "| workload | config | " + " | ".join(f"rep {i + 1}" for i in range(plan.tax_reps)) + " | median |",
        "|---|---|" + "--:|" * (plan.tax_reps + 1),
    ]
    for w in workloads:
        for c in configs:
            xs = [x for x in ops[c][w] if x is not None]
            if xs:
                lines.append(f"| {w} | {c} | " + " | ".join("—" if x is None else f"{x:,.0f}" for x in ops[c][w])
                             + f" | {median(xs):,.0f} |")
        for c in configs[1:]:
            if ratios(c, w):
                cells = [f"{x / b:.3f}" if x is not None and b else "—" for x, b in zip(ops[c][w], ops["baseline"][w])]
                lines.append(f"| {w} | *{c} / baseline* | " + " | ".join(cells) + f" | *{median(ratios(c, w)):.3f}* |")
    report.sections.append("\n".join(lines))


# -- 3. start-up -----------------------------------------------------------------------


def scenario_startup(env: Env, plan: Plan, stats: KernelStats, report: Report) -> None:
    runs = [env.run_json(env.worker("startup"), timeout=60)[-1] for _ in range(plan.startup_reps)]
    ms = [r["instrument_ms"] for r in runs]
    imports = [r["import_ms"] for r in runs]
    mb = [r["rss_added_kb"] / 1024 for r in runs]
    peak = [(r["hwm_kb"] - r["rss_before_kb"]) / 1024 for r in runs]
    report.check("3 start-up", "`instrument()` wall time until attached (median, max)",
                 f"{median(ms):.0f} ms (max {max(ms):.0f})", f"≤ {STARTUP_TARGET_MS} ms", median(ms) <= STARTUP_TARGET_MS)
    report.check("3 start-up", "RSS added by `instrument()`, after gc (median, max)",
                 f"{median(mb):.1f} MB (max {max(mb):.1f})", f"≤ {STARTUP_TARGET_MB} MB", median(mb) <= STARTUP_TARGET_MB)
    report.info("3 start-up", "peak RSS above the pre-instrument RSS (VmHWM; median)", f"{median(peak):.1f} MB")
    report.sections.append(
        "### 3. Start-up: every repetition\n\n"
        f"Fresh process per run, {plan.startup_reps} runs. instrument() ms: {', '.join(f'{x:.0f}' for x in ms)}; "
        f"RSS added MB: {', '.join(f'{x:.1f}' for x in mb)}; "
        f"`import otel_ebpf_flows` ms (not a target): {', '.join(f'{x:.0f}' for x in imports)}."
    )


# -- 4. in-process tax -----------------------------------------------------------------


def scenario_inproc(env: Env, plan: Plan, stats: KernelStats, report: Report) -> None:
    workloads = ["churn", "rr"]
    # baseline; instrumented (metrics only: no tracer provider, so no span records); instrumented with
    # an SDK TracerProvider (span enrichment on, as most users run it) and no span open; and, against a
    # baseline that makes the same spans, every op a CLIENT span with span enrichment on
    configs = ("baseline", "metrics", "spans", "baseline_spans", "every_span")
    names = {"baseline": "baseline", "metrics": "instrumented, no tracer provider",
             "spans": "instrumented, tracer provider (span enrichment), no span open",
             "baseline_spans": "baseline, every op a span", "every_span": "instrumented, every op a span"}
    versus = {"metrics": "baseline", "spans": "baseline", "every_span": "baseline_spans"}
    flags = {"baseline": [], "metrics": ["--instrument"], "spans": ["--instrument", "--tracer-provider"],
             "baseline_spans": ["--spans"], "every_span": ["--instrument", "--spans"]}
    res: Dict[str, Dict[str, List[Dict[str, Any]]]] = {c: {w: [] for w in workloads} for c in configs}
    cpu = max(os.sched_getaffinity(0))
    for rep in range(plan.inproc_reps):
        k = rep % len(configs)
        for config in configs[k:] + configs[:k]:
            argv = env.worker("inproc", ",".join(workloads), "--duration", str(plan.inproc_seconds), "--cpu", str(cpu))
            argv += flags[config]
            for r in env.run_json(env.in_netns(argv), timeout=120):
                res[config][r["mode"]].append(r)
        log(f"inproc rep {rep + 1}/{plan.inproc_reps} done")

    lines = [
        "### 4. In-process tax: every repetition",
        "",
        f"One Python process: a threaded server (2 threads) and one client thread, {plan.inproc_seconds:g} s per "
        f"workload (churn, then rr), a fresh process and network namespace per run, pinned to CPU {cpu} (unpinned, "
        "GIL hand-offs between two CPUs made the baseline swing 4× from run to run). Every configuration has the "
        "same SDK MeterProvider with a PeriodicExportingMetricReader exporting every 1 s to a discarding exporter "
        "(60× the SDK default rate, so collections happen inside every run); the configurations rotate inside each "
        "repetition. *no tracer provider*: span enrichment's kernel side never starts; *tracer provider*: an SDK "
        "TracerProvider is passed to `instrument()` and the workload makes no spans (span enrichment on, idle: "
        "the kernel makes span records only while a span is open); *every op a span*: each op is a CLIENT span "
        "(started before connecting or sending, ended after the response; a BatchSpanProcessor exporting to a "
        "discarding exporter), compared with the same workload and spans without the library, so the ratio is "
        "span enrichment's cost per span. *events lost*: the library's own "
        "`ebpf_flows.probe.events.lost` during each instrumented run, by probe (`events`: records dropped because "
        "the ring buffer was full; `conn_events`: span records dropped; `syn_wait`: server handshakes whose start "
        "was not found).",
        "",
        "| workload | config | ops/s per rep | p99 µs per rep | median ops/s | median p99 µs | events lost per rep |",
        "|---|---|---|---|--:|--:|---|",
    ]
    for w in workloads:
        for c in configs:
            xs = [r["ops_per_s"] for r in res[c][w]]
            ps = [r["p99_us"] for r in res[c][w]]
            lost = ", ".join(fmt_lost(r["events_lost"]) for r in res[c][w]) if c in versus else "—"
            lines.append(f"| {w} | {names[c]} | {', '.join(f'{x:,.0f}' for x in xs)} | "
                         f"{', '.join(f'{p:,.0f}' for p in ps)} | {median(xs):,.0f} | {median(ps):,.0f} | {lost} |")
        for c, against in versus.items():
            base = median([r["ops_per_s"] for r in res[against][w]])
            bp = median([r["p99_us"] for r in res[against][w]])
            inst = median([r["ops_per_s"] for r in res[c][w]])
            ip = median([r["p99_us"] for r in res[c][w]])
            report.check("4 in-process", f"{WORKLOAD_NAMES[w]}, {names[c]}: throughput / {names[against]}",
                         f"{inst / base:.3f} ({inst:,.0f} vs {base:,.0f}/s)", f"≥ {INPROC_TPUT_TARGET}",
                         inst / base >= INPROC_TPUT_TARGET)
            report.check("4 in-process", f"{WORKLOAD_NAMES[w]}, {names[c]}: p99 latency / {names[against]}",
                         f"{ip / bp:.2f}× ({ip:,.0f} vs {bp:,.0f} µs)", f"≤ {INPROC_P99_TARGET}×",
                         ip / bp <= INPROC_P99_TARGET)
    report.sections.append("\n".join(lines))


# -- 5. reader thread -------------------------------------------------------------------


def scenario_reader(env: Env, plan: Plan, stats: KernelStats, report: Report) -> None:
    runs = []
    for _ in range(plan.reader_reps):
        argv = env.worker("reader", "--loadgen", str(env.loadgen), "--rate", "1000", "--duration", str(plan.reader_seconds))
        runs.append(env.run_json(env.in_netns(argv), timeout=plan.reader_seconds + 60)[-1])
    cpu = [r["reader_cpu_pct"] for r in runs]
    rate = median([r["connections_per_s"] for r in runs])
    report.check("5 reader", f"reader-thread CPU at {rate:,.0f} connections/s, {plan.reader_seconds:g} s (median)",
                 f"{median(cpu):.1f} % of a core (runs {', '.join(f'{c:.1f}' for c in cpu)})",
                 f"≤ {READER_CPU_TARGET_PCT:g} %", median(cpu) <= READER_CPU_TARGET_PCT)
    report.info("5 reader", "whole instrumented process CPU in the same runs (server included)",
                f"{median([r['process_cpu_pct'] for r in runs]):.0f} % of a core")
    micro = env.run_json(env.worker("micro"), timeout=120)[-1]
    report.info("5 reader", "Python cost per ring-buffer record, in parts: a span record into the span table "
                "(`decode_conn()` + `ConnTable.add_record()`, a CONN or a GONE); `decode_event()`; "
                "`decode_metric()` (histogram records); one SDK `Histogram.record()`; one point through the "
                "library's fast path instead (`_histogram.py`); a whole close record (decode + duration and RTT "
                "points)",
                f"{micro['span_record_us']:.1f} µs; {micro['decode_event_us']:.1f} µs; "
                f"{micro['decode_metric_us']:.1f} µs; {micro['histogram_record_us']:.1f} µs; "
                f"{micro['fast_record_us']:.1f} µs; {micro['close_record_us']:.1f} µs")
    cpu = max(os.sched_getaffinity(0))
    ends: Dict[bool, List[Dict[str, Any]]] = {False: [], True: []}
    for rep in range(plan.span_reps):
        for instrumented in ((False, True) if rep % 2 == 0 else (True, False)):
            argv = env.worker("spans", "--cpu", str(cpu), *(["--instrument"] if instrumented else []))
            ends[instrumented].append(env.run_json(env.in_netns(argv), timeout=120)[-1])
    med = {b: median([r["end_us_median"] for r in ends[b]]) for b in (False, True)}
    p99 = {b: median([r["end_us_p99"] for r in ends[b]]) for b in (False, True)}
    report.info("5 reader", "per-span cost of span enrichment: `span.end()` of a client span with a "
                "BatchSpanProcessor, enrichment on vs off (median of runs' median; p99)",
                f"+{med[True] - med[False]:.0f} µs ({med[True]:.0f} vs {med[False]:.0f} µs; "
                f"p99 {p99[True]:.0f} vs {p99[False]:.0f} µs)")

    lines = [
        "### 5. Reader thread and collections",
        "",
        f"CPU: the instrumented process serves (Python, 4 server threads) what the native load generator opens at "
        f"1,000 connections/s ({plan.reader_seconds:g} s, {plan.reader_reps} run(s)); the reader thread's utime+stime "
        "from /proc/self/task/TID/stat; an InMemoryMetricReader collected every 5 s. Collections: the instrumented "
        f"process holds N client connections (the other ends in an uninstrumented peer process) and collects "
        f"{plan.collections} times, 0.5–0.6 s apart at random phases (so at least one collection meets the 5 s RTT "
        "sampling pass); "
        "*GIL stall* is the longest a thread sleeping 1 ms at a time woke late meanwhile.",
        "",
        f"Reader-thread runs: events lost {', '.join(fmt_lost(r['events_lost']) for r in runs)}; "
        f"collection ms {', '.join(f'{t:.1f}' for r in runs for t in r['collections_ms'])}.",
        "",
        "| connections | collection ms (each) | max ms | median ms | GIL stall max ms |",
        "|--:|---|--:|--:|--:|",
    ]
    for n in (0, 1000, 10000):
        argv = env.worker("collect", "--connections", str(n), "--collections", str(plan.collections))
        r = env.run_json(env.in_netns(argv), timeout=180)[-1]
        ts = r["collections_ms"]
        if n == 0:
            report.info("5 reader", "longest collection with no connections at all (the floor)",
                        f"{max(ts):.1f} ms (median {median(ts):.1f})")
        else:
            report.check("5 reader", f"longest collection (`get_metrics_data()`) with {n:,} live connections",
                         f"{max(ts):.1f} ms (median {median(ts):.1f})", f"≤ {COLLECT_TARGET_MS:g} ms",
                         max(ts) <= COLLECT_TARGET_MS)
        lines.append(f"| {n:,} | {', '.join(f'{t:.1f}' for t in ts)} | {max(ts):.1f} | {median(ts):.1f} | "
                     f"{r['gil_max_late_ms']:.1f} |")
    report.sections.append("\n".join(lines))


# -- the run ---------------------------------------------------------------------------

SCENARIOS: Dict[str, Callable[[Env, Plan, KernelStats, Report], None]] = {
    "cost": scenario_cost, "tax": scenario_tax, "startup": scenario_startup,
    "inproc": scenario_inproc, "reader": scenario_reader,
}


def machine() -> Dict[str, str]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    rev = commit.stdout.strip() or "?"
    if dirty.stdout.strip():
        rev += " + uncommitted changes"
    sys.path.append(str(ROOT))
    try:
        from otel_ebpf_flows import _libbpf

        libbpf = _libbpf.libbpf_version()
    except Exception:  # reported as unknown
        libbpf = "?"
    return {"nproc": str(os.cpu_count()), "kernel": platform.release(), "cpu": cpu, "python": platform.python_version(),
            "libbpf": libbpf, "commit": rev}


def foreign_bpf_programs() -> List[str]:
    """Tracing programs loaded by someone else (checked between scenarios, when none of ours is loaded)."""
    out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True)
    try:
        progs = json.loads(out.stdout)
    except ValueError:
        return []
    return sorted(p.get("name", "?") for p in progs
                  if p.get("type") in ("tracing", "raw_tracepoint", "tracepoint", "kprobe", "sock_ops"))


def render(report: Report, meta: Dict[str, str], command: str, took_s: float, quick: bool) -> str:
    mode = " (quick mode: fewer, shorter repetitions)" if quick else ""
    out = [
        BEGIN,
        "## Results",
        "",
        f"- **Date**: {meta['date']}; **command**: `{command}`{mode}; **took** {took_s / 60:.1f} min",
        f"- **Machine**: {meta['nproc']} CPUs ({meta['cpu']}), Linux {meta['kernel']}, Python {meta['python']}, "
        f"libbpf {meta['libbpf']}; otel-ebpf-flows at {meta['commit']}",
    ]
    out += [f"- {n}" for n in report.notes]
    out += ["", "| scenario | measure | figure | target | verdict |", "|---|---|---|---|---|"]
    for r in report.rows:
        verdict = {"MET": "MET", "NOT MET": "**NOT MET**", "NOT MEASURED": "**NOT MEASURED**"}.get(r.verdict, r.verdict)
        out.append(f"| {r.scenario} | {r.measure} | {r.figure} | {r.target} | {verdict} |")
    missed = [r for r in report.rows if r.verdict in ("NOT MET", "NOT MEASURED")]
    out += ["", "### Missed targets", ""]
    if missed:
        out += [f"- {r.scenario}: {r.measure}: **{r.figure}** (target {r.target})" for r in missed]
    else:
        out.append("None.")
    for s in report.sections:
        out += ["", s]
    out += ["", END]
    return "\n".join(out)


def write_readme(block: str) -> None:
    text = README.read_text() if README.exists() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    README.write_text(text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repetitions (about 2 minutes)")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help="comma-separated scenarios to run (default: all)")
    parser.add_argument("--no-write", action="store_true", help="print the results, leave README.md alone")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks/run needs root (BPF programs, network namespaces, bpf_stats_enabled)", file=sys.stderr)
        return 2
    missing = [t for t in ("unshare", "ip", "bpftool", "stdbuf") if shutil.which(t) is None]
    if not any(shutil.which(c) for c in ("gcc", "clang", "clang-14", "cc")):
        missing.append("a C compiler (gcc)")
    if missing:
        print(f"benchmarks/run needs {', '.join(missing)}: run scripts/setup", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    command = "benchmarks/run" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    started = time.monotonic()
    meta = machine()
    meta["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = Report()
    foreign: Set[str] = set()
    load_start = os.getloadavg()[0]

    stats = KernelStats()

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    with tempfile.TemporaryDirectory(prefix="otel-ebpf-flows-bench-") as tmp:
        env = Env(Path(tmp))
        try:
            env.build()
            stats.set(False)  # nothing but scenario 1 runs with accounting on
            for name, fn in SCENARIOS.items():
                if name not in wanted:
                    continue
                log(f"{name} …")
                foreign.update(foreign_bpf_programs())
                t0 = time.monotonic()
                try:
                    fn(env, plan, stats, report)
                except (subprocess.CalledProcessError, subprocess.TimeoutExpired, RuntimeError, KeyError,
                        ValueError, OSError) as exc:
                    detail = getattr(exc, "stderr", None) or ""
                    msg = re.sub(r"\s+", " ", f"{exc} {detail}".strip())[:300]
                    log(f"{name} failed: {msg}")
                    report.rows.append(Row(name, "scenario failed", msg.replace("|", "/"), "—", "NOT MEASURED"))
                log(f"{name} took {time.monotonic() - t0:.0f} s")
        finally:
            CHILDREN.stop_all()
            stats.restore()
    report.notes.append(f"Load average (1 min) at start {load_start:.2f}, at end {os.getloadavg()[0]:.2f} "
                        f"(anything above 0 is other work on the machine, which widens the spread)")
    if foreign:
        names = sorted(foreign)
        report.notes.append("Tracing BPF programs of other processes were loaded during the run (they tax every "
                            f"configuration alike): {', '.join(names[:12])}{' …' if len(names) > 12 else ''}")
    block = render(report, meta, command, time.monotonic() - started, args.quick)
    print(block)
    if not args.no_write:
        write_readme(block)
        log(f"results written to {README.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted: background processes stopped, kernel.bpf_stats_enabled restored, README.md untouched")
        sys.exit(130)
