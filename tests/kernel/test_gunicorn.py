"""gunicorn, 3 workers (examples/gunicorn): each worker reports exactly the connections it served and opened."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.kernel.conftest import total

pytest.importorskip("gunicorn", reason="the test extra brings gunicorn: pip install -e '.[test]'")

ATTEMPTS = "ebpf_flows.tcp.connection.attempts"
CLOSES = "ebpf_flows.tcp.connection.closes"


def ok_attempts(points, role):
    return sum(p["value"] for p in points
               if p["name"] == ATTEMPTS and p["attrs"].get("ebpf_flows.tcp.role") == role
               and "error.type" not in p["attrs"])


def test_each_gunicorn_worker_reports_its_own_connections(run_scenario):
    r = run_scenario("gunicorn_workers")
    workers, n = r["workers"], r["requests"]
    assert r["status"] == 0 and "Traceback" not in r["stderr"], r["stderr"]
    assert len(workers) == 3 and all(w["restarted"] for w in r["ready"]), r["ready"]
    served_by = Counter(r["answered_by"])
    assert sum(served_by.values()) == n
    for w in workers:
        # what the worker's app counted, and which worker the client saw answer
        assert w["served"] == served_by.get(str(w["pid"]), 0) == w["upstream"], w
        pts = w["points"]
        assert ok_attempts(pts, "server") == w["served"], (w["pid"], w["served"], pts)
        assert ok_attempts(pts, "client") == w["upstream"], (w["pid"], w["upstream"], pts)
        assert total(pts, ATTEMPTS, error__type="refused") == 0
        assert total(pts, CLOSES, ebpf_flows__tcp__close__reason="normal") == 2 * w["served"], pts
        assert total(pts, CLOSES) == 2 * w["served"], pts
        assert total(pts, "ebpf_flows.probe.events.lost") == 0, pts
        assert total(pts, "ebpf_flows.probe.map.evictions") == 0, pts
    # the master accepts nothing and opens nothing: it reports none of its workers' connections
    assert ok_attempts(r["master"]["points"], "server") == 0
    assert ok_attempts(r["master"]["points"], "client") == 0
    # together, exactly the kernel's count for the namespace: the gunicorn side and the upstream side
    mib = r["mib"]
    assert mib["Tcp.ActiveOpens"] == 2 * n  # the test's requests and the workers' upstream connects
    assert mib["Tcp.PassiveOpens"] == 2 * n  # accepted by the workers and by the echo peer
    assert sum(ok_attempts(w["points"], "server") for w in workers) == n
    assert sum(ok_attempts(w["points"], "client") for w in workers) == n
    assert mib["Tcp.AttemptFails"] == 0 and mib["Tcp.EstabResets"] == 0
