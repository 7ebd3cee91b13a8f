"""``watch``'s model and layout over a scripted source: rows, rates, percentiles, sorting, filters, output."""

from __future__ import annotations

import io
import ipaddress
import json
from typing import Dict, List, Optional

import pytest

from otel_ebpf_flows import __main__ as cli
from otel_ebpf_flows._source import Counters, FlowEvent, FlowKey, ProbeStats, Role, Snapshot
from otel_ebpf_flows._watch import (
    COLUMNS,
    SORT_NAMES,
    Filter,
    FlowTable,
    View,
    completeness,
    fit_columns,
    fmt_bytes,
    fmt_duration,
    percentile,
    render,
    run_watch,
    snapshot_json,
    sort_rows,
)
from otel_ebpf_flows.exceptions import UnsupportedEnvironment

from .fakes import FakeSource

A = FlowKey(Role.CLIENT, "10.0.0.1", 443, "ipv4")
B = FlowKey(Role.CLIENT, "10.0.0.2", 5432, "ipv4")
S = FlowKey(Role.SERVER, "2001:db8::7", 8080, "ipv6")
LISTENER = FlowKey(Role.SERVER, "", 8080, "")
OVERFLOW = FlowKey(Role.CLIENT, None, 0, "")


def counters(**kw: object) -> Counters:
    return Counters(**kw)  # type: ignore[arg-type]


def snap(c: Dict[FlowKey, Counters], probes: Optional[ProbeStats] = None) -> Snapshot:
    return Snapshot(counters=c, probes=probes or ProbeStats())


def event(kind: str, key: FlowKey, duration: float = 0.0, srtt: Optional[float] = None) -> FlowEvent:
    return FlowEvent(kind=kind, key=key, ts_ns=1, duration_s=duration, srtt_s=srtt)


def rows_by_key(table: FlowTable) -> Dict[FlowKey, object]:
    return {r.key: r for r in table.rows()}


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(list(reversed(values)), 100) == 100.0


def test_rows_carry_counters_and_rates_over_the_last_refresh() -> None:
    table = FlowTable()
    failed = dict.fromkeys(("refused", "timed_out", "reset", "host_unreachable", "net_unreachable", "_OTHER"), 0)
    table.update(snap({A: counters(retransmits=10)}), now=100.0)  # the baseline
    failed["refused"] = 2
    table.update(snap({A: counters(attempts_ok=5, attempts_failed=failed, established=5, closed=3, retransmits=16,
                                   bytes_transmitted=2048, bytes_received=10, resets_sent=1, resets_received=2,
                                   zero_window_receive=1, zero_window_transmit=2)}), now=102.0)
    (row,) = table.rows()
    assert (row.attempts, row.failed, row.active) == (7, 2, 2)
    assert row.failed_by["refused"] == 2
    assert row.retransmits == 16 and row.retransmits_per_s == pytest.approx(3.0)  # 6 more in 2 s
    assert (row.resets_sent, row.resets_received, row.zero_windows) == (1, 2, 3)
    assert (row.bytes_transmitted, row.bytes_received) == (2048, 10)
    table.update(snap({A: counters(retransmits=16)}), now=104.0)
    assert table.rows()[0].retransmits_per_s == 0.0


def test_a_peer_first_seen_after_the_baseline_counts_its_retransmits_as_new() -> None:
    table = FlowTable()
    table.update(snap({}), now=0.0)
    table.update(snap({B: counters(attempts_ok=1, retransmits=4)}), now=2.0)
    assert table.rows()[0].retransmits_per_s == pytest.approx(2.0)


def test_handshake_and_rtt_percentiles_come_from_records() -> None:
    table = FlowTable(window=4)
    for d in (0.001, 0.002, 0.003, 0.004, 0.5):  # window 4: the oldest falls out
        table.on_event(event("handshake", A, duration=d))
    table.on_event(event("rtt", A, srtt=0.010))
    table.on_event(event("close", A, srtt=0.030))
    table.on_event(event("close", A, srtt=None))  # no sample: ignored
    table.update(snap({A: counters(attempts_ok=5)}), now=1.0)
    (row,) = table.rows()
    assert row.handshakes == 4
    assert row.handshake_p50_s == 0.003 and row.handshake_p99_s == 0.5
    assert row.rtt_s == 0.030 and row.rtt_p50_s == 0.010


def test_listener_series_become_listen_overflows_and_empty_overflow_keys_are_hidden() -> None:
    table = FlowTable()
    table.update(snap({LISTENER: counters(listen_overflows=7), OVERFLOW: counters(), A: counters(attempts_ok=1)}), 1.0)
    assert [r.key for r in table.rows()] == [A]
    assert table.listen_overflows == {8080: 7}
    table.update(snap({OVERFLOW: counters(attempts_ok=3), A: counters(attempts_ok=1)}), 2.0)
    assert {r.address for r in table.rows()} == {"10.0.0.1", "_OTHER"}


def test_sorting_each_key_and_reverse() -> None:
    table = FlowTable()
    table.update(snap({A: counters(attempts_ok=9, retransmits=1), B: counters(attempts_ok=1, retransmits=5),
                       S: counters(attempts_ok=3, bytes_received=10**6)}), 1.0)
    rows = table.rows()
    assert [r.key for r in sort_rows(rows, "retrans")] == [B, A, S]
    assert [r.key for r in sort_rows(rows, "retrans", reverse=True)] == [S, A, B]
    assert [r.key for r in sort_rows(rows, "conns")] == [A, S, B]
    assert [r.key for r in sort_rows(rows, "bytes")][0] == S
    assert [r.key for r in sort_rows(rows, "peer")] == [A, B, S]  # client before server, addresses in order
    for name in SORT_NAMES:  # every key sorts without error, ties in peer order
        assert sorted(r.key.port for r in sort_rows(rows, name)) == sorted(r.key.port for r in rows)


def test_filters() -> None:
    table = FlowTable()
    table.update(snap({A: counters(attempts_ok=1), B: counters(attempts_ok=1), S: counters(attempts_ok=1),
                       OVERFLOW: counters(attempts_ok=1)}), 1.0)
    keys = lambda f: {r.key for r in table.rows(f)}  # noqa: E731
    assert keys(Filter(ports=(443, 8080))) == {A, S}
    assert keys(Filter(networks=(ipaddress.ip_network("10.0.0.0/31"),))) == {A}
    assert keys(Filter(networks=(ipaddress.ip_network("2001:db8::/32"),))) == {S}
    assert keys(Filter(role="server")) == {S}
    assert keys(Filter(role="client", ports=(5432,))) == {B}
    mapped = FlowTable()
    mapped_key = FlowKey(Role.CLIENT, "::ffff:10.0.0.9", 80, "ipv4")
    mapped.update(snap({mapped_key: counters(attempts_ok=1)}), 1.0)
    assert [r.key for r in mapped.rows(Filter(networks=(ipaddress.ip_network("10.0.0.0/24"),)))] == [mapped_key]


def test_formatting() -> None:
    assert [fmt_duration(x) for x in (None, 42e-6, 0.0123, 0.25, 1.5, 250.0)] == \
        ["-", "42us", "12.3ms", "250ms", "1.5s", "250s"]
    assert [fmt_bytes(n) for n in (0, 1023, 1024, 1536, 150 * 1024, 5 * 1024**3)] == \
        ["0", "1023", "1.0K", "1.5K", "150K", "5.0G"]


def test_narrow_terminals_drop_the_least_essential_columns_first() -> None:
    wide = fit_columns([], 400)
    assert [c.title for c in wide] == [c.title for c in COLUMNS]
    narrow = fit_columns([], 80)
    titles = [c.title for c in narrow]
    assert sum(c.width + 1 for c in narrow) - 1 <= 80
    assert {"ROLE", "PEER", "PORT", "RETRANS"} <= set(titles)
    assert "ZWIN" not in titles and "RTTp50" not in titles


def test_render_shows_totals_self_telemetry_and_marks_the_sort_column() -> None:
    table = FlowTable()
    table.update(snap({A: counters(attempts_ok=2, retransmits=3), B: counters(attempts_ok=1),
                       LISTENER: counters(listen_overflows=4)}), 1.0)
    lines = render(table, width=200, height=40, variant="tp_btf", started=0.0, now=1.0, interval=2.0, view=View())
    text = [t for _, t in lines]
    assert "sort: retrans (descending)" in text[0]
    assert text[1].startswith("all: 2 peers  active 0  conns 3 (failed 0)  retrans 3")
    assert lines[2] == ("text", "complete: 0 records lost, 0 map evictions")
    head = next(t for kind, t in lines if kind == "head")
    assert "RETRANSv" in head.split()
    assert [kind for kind, t in lines if t.startswith("client")] == ["row", "row"]
    assert ("alert", "listen queue overflows: port 8080: 4") in lines


def test_render_says_when_numbers_are_incomplete() -> None:
    probes = ProbeStats(events_lost={"tcp_flows.events": 3, "tcp_flows.syn_wait": 0},
                        map_evictions={"tcp_flows.flows": 5})
    assert completeness(probes) == (
        False, "INCOMPLETE: 3 records lost (ring buffer full), 5 counts folded into _OTHER (too many peers)")
    table = FlowTable()
    table.update(snap({A: counters(attempts_ok=1)}, probes), 1.0)
    lines = render(table, width=200, height=None, variant="raw_tp", started=0.0, now=1.0, interval=1.0, view=View())
    assert ("alert", completeness(probes)[1]) in lines
    assert json.loads(json.dumps(snapshot_json(table, variant="raw_tp", started=0.0, now=1.0, interval=1.0,
                                               view=View())))["probes"]["complete"] is False


def test_render_fits_the_height_and_says_how_many_rows_are_hidden() -> None:
    table = FlowTable()
    keys = [FlowKey(Role.CLIENT, f"10.1.0.{i}", 80, "ipv4") for i in range(30)]
    table.update(snap({k: counters(attempts_ok=1) for k in keys}), 1.0)
    lines = render(table, width=120, height=12, variant="tp_btf", started=0.0, now=1.0, interval=1.0, view=View())
    assert len(lines) <= 12
    assert sum(1 for _, t in lines if t.startswith("client")) == 5
    assert "(25 more rows below)" in lines[2][1]
    assert all(len(t) <= 120 for _, t in lines)


def test_batch_prints_count_snapshots_then_closes_the_source() -> None:
    source = FakeSource(snap({A: counters(attempts_ok=1, retransmits=2)}))
    out = io.StringIO()
    status = run_watch(interval=0.2, view=View(), count=2, as_json=True, source_factory=lambda _i: source, out=out)
    assert status == 0 and source.closed
    snaps = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(snaps) == 2
    row = snaps[-1]["rows"][0]
    assert (row["role"], row["address"], row["port"], row["retransmits"]) == ("client", "10.0.0.1", 443, 2)
    out = io.StringIO()
    source = FakeSource(snap({A: counters(attempts_ok=1)}))
    assert run_watch(interval=0.2, view=View(), count=1, batch=True, source_factory=lambda _i: source, out=out) == 0
    text = out.getvalue()
    assert "this host's TCP flows" in text and "\nclient 10.0.0.1" in text and "q quit" not in text


class Unloadable(FakeSource):
    def start(self, on_event: object) -> None:  # type: ignore[override]
        raise UnsupportedEnvironment("loading eBPF programs needs root or CAP_BPF and CAP_PERFMON")


def test_when_probes_cannot_load_it_exits_1_and_points_at_doctor() -> None:
    err, out = io.StringIO(), io.StringIO()
    status = run_watch(interval=1.0, view=View(), count=1, source_factory=lambda _i: Unloadable(), out=out, err=err)
    assert status == 1 and out.getvalue() == ""
    assert "cannot load the eBPF probes: loading eBPF programs needs root" in err.getvalue()
    assert "Run `otel-ebpf-flows doctor`" in err.getvalue()


@pytest.mark.parametrize("argv, message", [
    (["watch", "--interval", "0"], "expected from 0.2 to 3600 seconds"),
    (["watch", "--port", "70000"], "expected a port from 1 to 65535"),
    (["watch", "--peer", "10.0.0.300"], "is not an IP address or CIDR block"),
    (["watch", "--sort", "nope"], "invalid choice"),
    (["watch", "--count", "0"], "expected 1 or more"),
])
def test_bad_flags_are_usage_errors(argv: List[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_flags_become_the_view() -> None:
    args = cli.build_parser().parse_args(["watch", "--sort", "rtt", "-r", "--port", "443", "--port", "80",
                                          "--peer", "10.0.0.0/8", "--role", "client", "--limit", "5", "-n", "3"])
    assert (args.sort, args.reverse, args.port, args.role, args.limit, args.count) == \
        ("rtt", True, [443, 80], "client", 5, 3)
    assert args.peer == [ipaddress.ip_network("10.0.0.0/8")]
