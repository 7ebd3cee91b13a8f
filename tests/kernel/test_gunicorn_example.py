"""examples/gunicorn runs as its README says (`gunicorn -c gunicorn.conf.py app:app`) and each
worker prints its own kernel TCP metrics (test_gunicorn.py checks the numbers per worker)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.kernel.conftest import ROOT

pytest.importorskip("gunicorn", reason="the test extra brings gunicorn: pip install -e '.[test]'")

DRIVER = r"""
import os, signal, subprocess, sys, time, urllib.request
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
import socket
deadline = time.monotonic() + 30
while time.monotonic() < deadline:  # gunicorn is listening
    try:
        socket.create_connection(("127.0.0.1", 8000), timeout=1).close()
        break
    except OSError:
        time.sleep(0.1)
# As a person would (README: "then, in another terminal, curl"): a worker counts from the moment its
# own probes are loaded, which it does in the background after the fork (issue 6 notes the gap).
time.sleep(3)
served = []
while time.monotonic() < deadline + 30 and len(served) < 9:
    try:
        with urllib.request.urlopen("http://127.0.0.1:8000/", timeout=5) as r:
            served.append(r.read().decode().split()[-1])
    except OSError:
        time.sleep(0.2)
time.sleep(11)  # the example exports every 10 s
proc.send_signal(signal.SIGTERM)
out, err = proc.communicate(timeout=60)
sys.stdout.write("SERVED " + " ".join(served) + "\n" + out)
sys.stderr.write(err)
"""


def test_the_gunicorn_example_runs_as_documented(kernel_ok):
    proc = subprocess.run(["unshare", "--net", sys.executable, "-c", DRIVER],
                          cwd=os.path.join(ROOT, "examples", "gunicorn"), capture_output=True, text=True,
                          timeout=180, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, _, out = proc.stdout.partition("\n")
    served = first.split()[1:]
    assert len(served) == 9, (first, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "ebpf_flows.tcp.connection.attempts" in out
    # every worker that served a request printed points under its own process.pid
    pids = set(re.findall(r'"process\.pid":\s*(\d+)', out))
    assert set(served) <= pids, (served, pids)
