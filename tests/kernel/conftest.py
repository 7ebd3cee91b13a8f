"""Kernel tests: real probes on the real kernel, one private network namespace per scenario.

Each test runs ``python -m tests.kernel.workload SCENARIO`` under ``unshare --net``
and reconciles what the library exported with the kernel's own counters. They
skip only on a host that cannot run them, with the reason; under CI (CI=true)
a missing prerequisite is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _missing() -> Optional[str]:
    if not sys.platform.startswith("linux"):
        return "kernel tests need Linux"
    if os.geteuid() != 0:
        return "kernel tests need root (network namespaces, nftables, BPF)"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "kernel tests need BTF (/sys/kernel/btf/vmlinux)"
    for tool in ("unshare", "nft", "ip"):
        if shutil.which(tool) is None:
            return f"kernel tests need {tool} on PATH"
    return None


@pytest.fixture(scope="session")
def kernel_ok() -> None:
    reason = _missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must run the kernel tests")
        pytest.skip(reason)


@pytest.fixture
def run_scenario(kernel_ok: None) -> Callable[[str], Dict[str, Any]]:
    def run(name: str) -> Dict[str, Any]:
        proc = subprocess.run(
            ["unshare", "--net", sys.executable, "-m", "tests.kernel.workload", name],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )
        if proc.returncode != 0:
            raise AssertionError(f"scenario {name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run


def points(rows: List[Dict[str, Any]], name: str, **attrs: Any) -> List[Dict[str, Any]]:
    """Points of metric ``name`` whose attributes include ``attrs`` (dots as __)."""
    want = {k.replace("__", "."): v for k, v in attrs.items()}
    return [r for r in rows if r["name"] == name and all(r["attrs"].get(k) == v for k, v in want.items())]


def total(rows: List[Dict[str, Any]], name: str, **attrs: Any) -> int:
    return sum(r["value"] for r in points(rows, name, **attrs))


def skipped(rows: List[Dict[str, Any]]) -> int:
    """Kernel events no probe ran for (``events.lost{tcp_flows.skipped}``; host-wide, so maybe not ours)."""
    return sum(r["value"] for r in rows if r["name"] == "ebpf_flows.probe.events.lost"
               and r["attrs"].get("ebpf_flows.probe.name") == "tcp_flows.skipped")


def exact(got: int, want: int, rows: List[Dict[str, Any]]) -> None:
    """``got == want``, unless the kernel skipped events: then short by at most that many."""
    n = skipped(rows)
    assert (want - n <= got <= want) if n else got == want, (got, want, n)
