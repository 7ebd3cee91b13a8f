"""A forked child never reports its parent's connections as its own."""

from __future__ import annotations


def test_forked_child_reports_no_parent_traffic(run_scenario):
    r = run_scenario("fork_child")
    parent, child = r["parent"], r["child"]
    assert parent["attempts"] == 3, r  # the parent's own connections, counted once
    assert child["attempts"] == 0 and child["pipeline"] is False, r
    assert child["instrumented_again"] is True
    assert child["attempts_after_reinstrument"] == 2  # the child's own, after instrumenting itself
