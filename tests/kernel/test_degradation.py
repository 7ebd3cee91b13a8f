"""Degradation matrix: each missing piece gives ONE clear warning, the unprivileged sock_diag
fallback on Linux (a no-op elsewhere, or with mode=ebpf; the app unharmed either way), and a
`doctor` that says what is missing and how to fix it; exactly CAP_BPF + CAP_PERFMON works.

Each condition is produced for real where one machine can: another uid and capability set
(setpriv), libbpf hidden or replaced and BTF hidden in a private mount namespace. Two are
simulated, and say so: the kernel refusing tp_btf programs, and a non-Linux platform.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any, Dict, List, Optional

import pytest

from otel_ebpf_flows import _kernel
from tests.kernel.conftest import ROOT

SCRIPT = os.path.join(ROOT, "tests", "kernel", "degraded.py")
SYSTEM_PYTHON = "/usr/bin/python3"


def site_packages() -> str:
    import attrs

    return os.path.dirname(os.path.dirname(os.path.abspath(attrs.__file__)))


@pytest.fixture(scope="module")
def unprivileged_python(kernel_ok: None) -> List[str]:
    """Debian's interpreter (the repo's may live under /root, which nobody cannot read), with this
    checkout and the test environment's packages on its path; both must be readable by nobody."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop privileges")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is needed: an interpreter outside /root (apt-get install python3)")
    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    if version != str(tuple(sys.version_info[:2])):
        pytest.skip(f"{SYSTEM_PYTHON} is Python {version}, the test environment's packages are for "
                    f"{sys.version_info[:2]}")
    for path in (ROOT, site_packages()):
        p = path
        while p != "/":
            if not os.stat(p).st_mode & 0o005:
                pytest.skip(f"{p} is not readable by other users: nobody cannot import from it")
            p = os.path.dirname(p)
    return ["env", f"PYTHONPATH={ROOT}:{site_packages()}", SYSTEM_PYTHON]


def run(inner: List[str], prelude: str = "", mount_ns: bool = False, args: Optional[List[str]] = None) -> Dict[str, Any]:
    """SCRIPT under ``inner`` (an interpreter command) in a new netns (and mount ns), after ``prelude``."""
    shell = "ip link set lo up && " + (prelude + " && " if prelude else "") + 'exec "$@"'
    cmd = ["unshare", "--net"] + (["--mount"] if mount_ns else []) + ["sh", "-c", shell, "sh",
                                                                       *inner, SCRIPT, *(args or [])]
    proc = subprocess.run(cmd, cwd="/", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def warnings(r: Dict[str, Any]) -> List[str]:
    return [x["message"] for x in r["records"] if x["logger"].startswith("otel_ebpf_flows")]


def failed(r: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {c["name"]: c for c in r["doctor"]["checks"] if c["ok"] is False}


def assert_off_and_unharmed(r: Dict[str, Any], *words: str, fallback: bool = True) -> str:
    """ONE warning naming the problem; on Linux the sock_diag fallback runs (doctor's mode line says so)."""
    msgs = warnings(r)
    assert len(msgs) == 1, msgs  # ONE line
    for word in words:
        assert word in msgs[0], (word, msgs[0])
    mode = [c for c in r["doctor"]["checks"] if c["name"] == "mode"]
    if fallback:
        assert r["on"] is True and r["variant"] == "sock_diag", r
        assert "kernel TCP telemetry runs in sock_diag mode because" in msgs[0], msgs[0]
        assert mode and mode[0]["ok"] is None and mode[0]["detail"].startswith("sock_diag (the fallback)"), mode
    else:
        assert r["on"] is False, r
    assert r["mib"]["Tcp.ActiveOpens"] == 3 and r["mib"]["Tcp.PassiveOpens"] == 3  # the app ran on
    assert r["doctor"]["will_work"] is False
    return msgs[0]


def test_nobody_without_capabilities(unprivileged_python):
    r = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
             "--bounding-set=-all", *unprivileged_python])
    assert r["uid"] == 65534
    assert_off_and_unharmed(r, "CAP_BPF and CAP_PERFMON", "setcap")
    assert "privileges" in failed(r) and "setcap" in failed(r)["privileges"]["fix"]


def test_nobody_without_capabilities_in_ebpf_mode(unprivileged_python):
    """mode=ebpf forbids the fallback: one warning and nothing else, as before sock_diag mode."""
    env, path, python = unprivileged_python
    r = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
             "--bounding-set=-all", env, path, "OTEL_PYTHON_EBPF_FLOWS_MODE=ebpf", python])
    assert r["uid"] == 65534
    assert_off_and_unharmed(r, "kernel TCP telemetry is off: loading eBPF programs needs root or CAP_BPF and "
                            "CAP_PERFMON", fallback=False)
    assert set(failed(r)) == {"privileges", "mode"}
    assert failed(r)["mode"]["detail"].startswith("off: mode is ebpf")


def test_exactly_cap_bpf_and_cap_perfmon_as_nobody(unprivileged_python):
    caps = "-all,+bpf,+perfmon"
    r = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", f"--inh-caps={caps}",
             f"--ambient-caps={caps}", f"--bounding-set={caps}", *unprivileged_python])
    assert r["uid"] == 65534
    assert r["on"] is True and warnings(r) == [], r["records"]
    assert r["attempts"] == {"client": 3, "server": 3}, r
    assert r["mib"]["Tcp.ActiveOpens"] == 3 and r["mib"]["Tcp.PassiveOpens"] == 3
    assert r["doctor"]["will_work"] is True, failed(r)


def libbpf_file() -> str:
    import ctypes.util

    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib64"):
        path = os.path.join(d, name)
        if os.path.exists(path):
            return os.path.realpath(path)
    pytest.skip(f"cannot find the file of {name}")


def test_libbpf_missing(kernel_ok):
    r = run([sys.executable], prelude=f"mount --bind /dev/null {libbpf_file()}", mount_ns=True)
    assert_off_and_unharmed(r, "libbpf was not found", "install libbpf 1.0")
    assert "libbpf" in failed(r)


def test_libbpf_older_than_1_0(kernel_ok, tmp_path):
    """A library by that name without the 1.0 API (built here: a stand-in for libbpf 0.x)."""
    cc = shutil.which("clang-14") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("a C compiler is needed to build the stand-in library (scripts/setup installs clang-14)")
    src = tmp_path / "old.c"
    src.write_text("int bpf_object__open(const char *path) { return 0; }\n")
    lib = tmp_path / "libbpf.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    os.chmod(tmp_path, 0o755)
    r = run([sys.executable], prelude=f"mount --bind {lib} {libbpf_file()}", mount_ns=True)
    assert_off_and_unharmed(r, "older than 1.0", "install libbpf 1.0")
    assert "libbpf" in failed(r)


def test_btf_missing(kernel_ok):
    r = run([sys.executable], prelude="mount -t tmpfs none /sys/kernel/btf", mount_ns=True)
    assert_off_and_unharmed(r, "BTF", "CONFIG_DEBUG_INFO_BTF=y")
    assert "BTF" in failed(r)


def test_tp_btf_refused_falls_back_to_raw_tp(kernel_ok):
    """Simulated: this kernel takes tp_btf, so the first load is made to fail; the raw_tp
    fallback is real and must count exactly (doctor reports the variant it loads)."""
    r = run([sys.executable], args=["--simulate", "tp_btf_refused"])
    assert r["on"] is True and r["variant"] == "raw_tp", r
    assert warnings(r) == [], r["records"]
    assert r["attempts"] == {"client": 3, "server": 3}, r
    assert r["mib"]["Tcp.ActiveOpens"] == 3


def test_kernel_without_rdonly_cast_loads_the_nocast_copies(kernel_ok):
    """Simulated: the first load (tp_btf programs using the bpf_rdonly_cast kfunc, Linux 6.2+)
    is refused; the tp_btf `_nocast` copies that probe-read the TCP header and the listener's
    accept queue are real and must count exactly."""
    r = run([sys.executable], args=["--simulate", "rdonly_cast_missing"])
    assert r["on"] is True and r["variant"] == "tp_btf", r
    assert {"tp_btf_set_state_nocast", "tp_btf_probe_nocast"} <= set(r["attached"]), r["attached"]
    assert not {"tp_btf_set_state", "tp_btf_probe"} & set(r["attached"]), r["attached"]
    assert warnings(r) == [], r["records"]
    assert r["attempts"] == {"client": 3, "server": 3}, r
    assert r["mib"]["Tcp.ActiveOpens"] == 3 and r["mib"]["Tcp.PassiveOpens"] == 3, r["mib"]
    # the server's SYN wait, found on the accept queue by probe reads (queued_synack_us)
    assert r["handshakes"] == {"client": 3, "server": 3} and r["syn_wait_lost"] == 0, r


def test_each_build_times_every_server_handshake(kernel_ok):
    """The programs this kernel loads first (bpf_rdonly_cast, bpf_loop): every handshake of the
    3 connections (MIB PassiveOpens/ActiveOpens) timed, none counted as a lost SYN wait."""
    r = run([sys.executable], args=["--simulate", "none"])
    assert r["on"] is True and r["variant"] == "tp_btf", r
    # each hook's nested copy a jump into its main program (this kernel takes the tail call)
    assert {"tp_btf_set_state", "tp_btf_set_state_jump"} <= set(r["attached"]), r["attached"]
    assert not [n for n in r["attached"] if n.endswith("_nested")], r["attached"]
    assert r["mib"]["Tcp.ActiveOpens"] == 3 and r["mib"]["Tcp.PassiveOpens"] == 3, r["mib"]
    assert r["handshakes"] == {"client": 3, "server": 3} and r["syn_wait_lost"] == 0, r


def test_a_kernel_refusing_the_tail_call_loads_full_nested_copies(kernel_ok):
    """Simulated: the kernel will not take a main program into its hook's program array (the
    nested copies that jump to it); the same programs are loaded again with nested copies built
    as their main programs, which are real and must count exactly; no warning."""
    r = run([sys.executable], args=["--simulate", "tail_call_refused"])
    assert r["on"] is True and r["variant"] == "tp_btf", r
    nested = [n for n in r["attached"] if n.endswith("_nested")]
    assert len(nested) == len(_kernel.NESTED_HOOKS) and "tp_btf_set_state_nested" in nested, r["attached"]
    assert not [n for n in r["attached"] if n.endswith("_jump")], r["attached"]
    assert warnings(r) == [], r["records"]
    assert r["attempts"] == {"client": 3, "server": 3}, r
    assert r["mib"]["Tcp.ActiveOpens"] == 3 and r["mib"]["Tcp.PassiveOpens"] == 3, r["mib"]
    assert r["handshakes"] == {"client": 3, "server": 3} and r["syn_wait_lost"] == 0, r


def test_a_load_the_verifier_gave_up_on_a_pending_signal_is_tried_again(kernel_ok):
    """Simulated: the first load fails with EAGAIN (a ptrace-based profiler stopping the process):
    the same programs (tp_btf with casts) are loaded again, not a lesser variant; no warning."""
    r = run([sys.executable], args=["--simulate", "verifier_interrupted_once"])
    assert r["on"] is True and r["variant"] == "tp_btf" and r["loads"] == 2, r
    assert "tp_btf_set_state" in r["attached"], r["attached"]
    assert warnings(r) == [], r["records"]
    assert r["attempts"] == {"client": 3, "server": 3}, r


def test_a_verifier_interrupted_at_every_load_names_the_profiler(kernel_ok):
    """Simulated: every load fails with EAGAIN: three tries of the first variant (the others
    would fail alike), then ONE warning that says what stops the process and how to avoid it."""
    r = run([sys.executable], args=["--simulate", "verifier_interrupted"])
    assert r["loads"] == 3, r
    msg = assert_off_and_unharmed(r, "interrupted 3 times", "ptrace", "py-spy", "--nonblocking",
                                  "after instrument()")
    assert "Resource temporarily unavailable" not in msg, msg  # the message says what EAGAIN meant here


def test_import_and_instrument_on_a_non_linux_platform(kernel_ok):
    """Simulated: sys.platform says darwin before the package is imported."""
    r = run([sys.executable], args=["--simulate", "not_linux"])
    assert_off_and_unharmed(r, "eBPF needs Linux", "darwin", fallback=False)
    assert list(failed(r)) == ["platform"]
