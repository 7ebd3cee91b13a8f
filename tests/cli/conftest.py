"""The command line as a person uses it: ``watch`` on a real terminal (tmux), ``doctor``, ``demo``.

Every test runs the installed command (``python -m otel_ebpf_flows``) as a
separate process with real probes; traffic is made in private network
namespaces (tests/cli/traffic.py) and reconciled with the namespace's MIB
counters. They skip only on a host that cannot run them, with the reason; under
CI (CI=true) a missing prerequisite is a failure.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from tests.kernel.conftest import _missing as _kernel_missing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = [sys.executable, "-m", "otel_ebpf_flows"]
#: runs CMD as nobody with no capabilities at all (KERNEL_NOTES.md)
UNPRIVILEGED = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all"]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI must run the command-line tests")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kernel_ok() -> None:
    reason = _kernel_missing()
    if reason:
        _unavailable(reason)


def run_traffic(port: int) -> Dict[str, Any]:
    """tests/cli/traffic.py in a fresh network namespace: its MIB deltas and what it did."""
    proc = subprocess.run(["unshare", "--net", sys.executable, "-m", "tests.cli.traffic", str(port)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        raise AssertionError(f"traffic failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result: Dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def service_port() -> int:
    """A port base (PORT..PORT+2) of our own, so another run's rows never mix with this one's."""
    return random.randrange(20000, 29000, 3)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, detail: Callable[[], str] = str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{detail()}")
        time.sleep(0.1)


class Tmux:
    """A private tmux server (its own socket) with one window of a fixed size."""

    def __init__(self, directory: str, width: int = 180, height: int = 40) -> None:
        self.socket = os.path.join(directory, "tmux.sock")
        self.width = width
        self.height = height
        self.session = "cli-test"

    def _tmux(self, *args: str) -> str:
        proc = subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)} failed: {proc.stderr}")
        return proc.stdout

    def start(self, command: str) -> None:
        """Run ``command`` (a shell command line) in a fresh window, from the repository root."""
        self._tmux("-f", "/dev/null", "new-session", "-d", "-s", self.session, "-x", str(self.width),
                   "-y", str(self.height), "-c", ROOT,
                   f"env TERM=xterm-256color PYTHONPATH={ROOT} {command}")

    def screen(self) -> List[str]:
        return self._tmux("capture-pane", "-p", "-t", self.session).splitlines()

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.session, *keys)

    def display(self, fmt: str) -> str:
        return self._tmux("display-message", "-p", "-t", self.session, fmt).strip()

    def pane_pid(self) -> int:
        return int(self.display("#{pane_pid}"))

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def tmux(kernel_ok: None) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        _unavailable("the watch tests need tmux (apt-get install tmux; scripts/setup installs it)")
    directory = tempfile.mkdtemp(prefix="otel-ebpf-flows-tmux-")
    term = Tmux(directory)
    try:
        yield term
    finally:
        term.kill()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def nobody_python(kernel_ok: None) -> Iterator[str]:
    """An interpreter ``nobody`` can run that imports this checkout.

    The test environment's interpreter may live where nobody cannot read (pyenv
    under /root). So: a virtual environment of Debian's /usr/bin/python3 in a
    world-readable temporary directory, whose .pth puts this checkout and this
    environment's site-packages (for attrs and the OpenTelemetry packages) on its
    path; it needs the same Python minor version as the test environment.
    """
    system = "/usr/bin/python3"
    if shutil.which("setpriv") is None:
        _unavailable("the unprivileged tests need setpriv (util-linux)")
    if not os.access(system, os.X_OK):
        _unavailable(f"the unprivileged tests need {system} (apt-get install python3 python3-venv)")
    version = subprocess.run([system, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = "{}.{}".format(*sys.version_info[:2])
    if version != ours:
        _unavailable(f"{system} is Python {version} but the test environment is {ours}: its site-packages "
                     "cannot be shared with an unprivileged interpreter")
    directory = tempfile.mkdtemp(prefix="otel-ebpf-flows-nobody-")
    try:
        os.chmod(directory, 0o755)
        venv = os.path.join(directory, "venv")
        subprocess.run([system, "-m", "venv", "--without-pip", venv], check=True, capture_output=True, timeout=120)
        python = os.path.join(venv, "bin", "python")
        site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        paths = [ROOT, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
        with open(os.path.join(site, "otel_ebpf_flows_checkout.pth"), "w") as f:
            f.write("\n".join(dict.fromkeys(paths)) + "\n")
        probe = subprocess.run([*UNPRIVILEGED, python, "-c", "import otel_ebpf_flows, opentelemetry.sdk"],
                               capture_output=True, text=True, cwd="/", timeout=60)
        if probe.returncode != 0:
            _unavailable("nobody cannot import this checkout or its dependencies from "
                         f"{', '.join(paths)} (a directory on the way is not world-readable?): "
                         f"{probe.stderr.strip().splitlines()[-1:]}")
        yield python
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def child_pids(pid: int) -> List[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def find_child(pid: int, marker: str, timeout: float = 30) -> int:
    """The child of ``pid`` whose command line contains ``marker``."""
    def look() -> Optional[int]:
        for child in child_pids(pid):
            try:
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        return child
            except OSError:
                continue
        return None

    found: int = wait_for(look, timeout, f"a child of {pid} running {marker}")
    return found
