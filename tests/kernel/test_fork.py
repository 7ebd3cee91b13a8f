"""Fork: a child restarts the probes for itself; parent and child each count only their own."""

from __future__ import annotations


def test_forked_child_restarts_and_counts_only_its_own(run_scenario):
    r = run_scenario("fork_child")
    parent, child = r["parent"], r["child"]
    assert child["restarted"] is True, r  # no instrument() call in the child
    assert child["at_start"] == {"client": 0, "server": 0}, r  # none of its parent's connections
    assert child["own"]["client"] == 2, r  # the child's own connects, after the fork
    assert parent["own"]["client"] == 3, r  # the parent's, counted once, not the child's
    # Both accept on the listener they share: each counts exactly what it accepted.
    assert parent["claiming"] is True and child["claiming"] is True, r
    assert parent["served"] + child["served"] == r["clients"], r
    assert parent["own"]["server"] == parent["served"], r
    assert child["own"]["server"] == child["served"], r
    # ... and together exactly what the kernel accepted in the namespace (after the fork: the
    # peer's clients, and the child's 2 connects, which the uninstrumented echo peer accepted)
    assert r["mib"]["Tcp.ActiveOpens"] == r["clients"] + 2, r
    assert r["mib"]["Tcp.PassiveOpens"] - 2 == parent["own"]["server"] + child["own"]["server"], r


def test_workers_serving_at_once_after_fork_are_counted_exactly(run_scenario):
    r = run_scenario("fork_serve_at_once")
    everyone = [r["parent"], *r["children"]]
    # the parent's own late connects are its only client connections: PassiveOpens are all served
    assert sum(p["served"] for p in everyone) == r["clients"] == r["mib"]["Tcp.PassiveOpens"], r
    assert sum(p["served"] for p in r["children"]) > 0, "no worker accepted anything: no test"
    # every connection counted exactly once, none lost to the restart after fork: those whose
    # handshake completed before the fork by the parent (it accepted the handshake before
    # claim mode existed), the rest by the worker that took them
    assert sum(p["counted"] for p in everyone) == r["clients"], r
    assert r["parent"]["counted"] == r["early"], r  # the handshakes completed before the fork
    assert all(p["counted"] <= p["served"] for p in r["children"]), r


def test_listen_overflows_of_a_shared_listener_are_counted_once(run_scenario):
    r = run_scenario("fork_shared_overflows")
    assert r["child"]["restarted"] is True, r
    assert r["mib"]["TcpExt.ListenOverflows"] > 0, "the flood did not overflow the queue: no test"
    # the listener's creator counts its drops; the child that inherited it does not count them again
    assert r["parent"]["overflows"] + r["child"]["overflows"] == r["mib"]["TcpExt.ListenOverflows"], r
    assert r["child"]["overflows"] == 0, r
