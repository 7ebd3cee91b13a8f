"""Every metric reconciled with ground truth the kernel keeps: MIB counters and TCP_INFO."""

from __future__ import annotations

import math

import pytest

from tests.kernel.conftest import exact, points, total

ATTEMPTS = "ebpf_flows.tcp.connection.attempts"
RETRANS = "ebpf_flows.tcp.retransmits"
IO = "ebpf_flows.tcp.io"
RESETS = "ebpf_flows.tcp.resets"
CLOSES = "ebpf_flows.tcp.connection.closes"
DURATION = "ebpf_flows.tcp.connection.duration"
ACTIVE = "ebpf_flows.tcp.connections.active"
ZERO = "ebpf_flows.tcp.zero_window.events"
WSCALE = "ebpf_flows.tcp.window_scaling.disabled"
OVERFLOWS = "ebpf_flows.tcp.listen.overflows"
RTT = "ebpf_flows.tcp.rtt"
HANDSHAKE = "ebpf_flows.tcp.handshake.duration"


def test_client_retransmits_and_bytes_under_loss(run_scenario):
    r = run_scenario("client_loss")
    rows, infos, n = r["points"], r["infos"], r["connections"]
    assert sum(i["total_retrans"] for i in infos) > 0, "5 % loss produced no retransmit: no test"
    # retransmits, SYN ones included, equal the kernel's per-socket count
    exact(total(rows, RETRANS, ebpf_flows__tcp__role="client"), sum(i["total_retrans"] for i in infos), rows)
    # payload bytes: TCP_INFO counts our FIN (acked) and theirs (received) once per connection
    assert total(rows, IO, network__io__direction="transmit") == r["payload"]
    assert sum(i["bytes_acked"] for i in infos) == r["payload"] + n
    assert total(rows, IO, network__io__direction="receive") == r["payload"]
    assert sum(i["bytes_received"] for i in infos) == r["payload"] + n
    assert total(rows, ATTEMPTS, ebpf_flows__tcp__role="client") == n == r["mib"]["Tcp.ActiveOpens"]
    assert total(rows, CLOSES, ebpf_flows__tcp__close__reason="normal") == n
    assert total(rows, ACTIVE) == 0
    # only this process's traffic: the echo server is another process
    assert not points(rows, ATTEMPTS, ebpf_flows__tcp__role="server")
    assert not points(rows, RETRANS, ebpf_flows__tcp__role="server")


def test_retransmits_no_probe_ran_for_are_counted_from_the_sockets_own_count(run_scenario):
    r = run_scenario("unseen_retransmits")
    rows = r["points"]
    assert len(r["detached"]) == 2, r["detached"]  # the main program and its nested copy
    assert r["unseen"] > 0, "5 % loss produced no retransmit while the probes were detached: no test"
    # every retransmit is counted, the detached half's included, exactly as the kernel counted them
    assert total(rows, RETRANS, ebpf_flows__tcp__role="client") == sum(r["totals"])
    # and the detached half's are reported as seen by no probe; the kernel may also have
    # skipped a probe of the attached half without a word (what this telemetry is for),
    # so the detached half is a lower bound
    unseen = total(rows, "ebpf_flows.probe.events.lost", ebpf_flows__probe__name="tcp_flows.unseen_retransmit")
    assert r["unseen"] <= unseen <= sum(r["totals"]), (r["unseen"], unseen, r["totals"])
    assert total(rows, ATTEMPTS, ebpf_flows__tcp__role="client") == 4 == r["mib"]["Tcp.ActiveOpens"]


@pytest.mark.parametrize("mode", ["", "_spans", "_claim"])
def test_handshakes_no_probe_ran_for_are_counted_on_both_ends(run_scenario, mode):
    """Found by the iterator or at the close (default), at the first send or receive (with the
    send/receive programs of span enrichment), or only when this process uses them (claim)."""
    r = run_scenario("unseen_handshakes" + mode)
    rows, mib, n = r["points"], r["mib"], r["normal"] + r["unseen"]
    assert len(r["detached"]) == 2, r["detached"]  # the main program and its nested copy
    assert r["claiming"] == (mode == "_claim")
    assert any("send_length" in name for name in r["attached"]) == bool(mode), r["attached"]
    # every attempt on both ends, exactly as the kernel counted them; none failed; the
    # connection that was in the accept queue at instrument() is not a new handshake
    assert total(rows, ATTEMPTS, ebpf_flows__tcp__role="client") == n == mib["Tcp.ActiveOpens"]
    assert total(rows, ATTEMPTS, ebpf_flows__tcp__role="server") == n == mib["Tcp.PassiveOpens"]
    assert not [p for p in points(rows, ATTEMPTS) if "error.type" in p["attrs"]]
    assert mib["Tcp.AttemptFails"] == 0
    # closed normally, both ends, plus the pre-existing connections' ends adopted at load (the
    # accepted one's both, the queued one's client end; its server end is never taken on)
    assert total(rows, CLOSES, ebpf_flows__tcp__close__reason="normal") == 2 * n + 3
    assert total(rows, CLOSES) == 2 * n + 3
    assert total(rows, ACTIVE) == 0
    # every socket taken on (by the programs or their global functions) was forgotten, and
    # the owned-socket filter counted each in and out: nothing tracked, nothing left counted
    assert r["balance"] == {"filter": 0, "tracked": 0}, r["balance"]
    # payload bytes from the start of each connection, both ends, both directions (and what the
    # queued pre-existing connection carried, on its adopted client end only)
    for role, extra in (("client", r["early_bytes"]), ("server", 0)):
        for direction in ("transmit", "receive"):
            assert total(rows, IO, ebpf_flows__tcp__role=role, network__io__direction=direction) \
                == n * r["size"] + extra, (role, direction)
    # the SYN and SYN-ACK retransmits the drop caused, every one, on the side that sent it
    retrans = [c["client_retrans"] for c in r["closed"]], [c["server_retrans"] for c in r["closed"]]
    assert sum(retrans[0]) > 0, "no SYN was retransmitted: no test"
    assert total(rows, RETRANS, ebpf_flows__tcp__role="client") == sum(retrans[0])
    assert total(rows, RETRANS, ebpf_flows__tcp__role="server") == sum(retrans[1])
    assert total(rows, RETRANS) == mib["Tcp.RetransSegs"] == mib["TcpExt.TCPSynRetrans"]
    # no handshake duration is guessed for them, nor a connection duration
    for role in ("client", "server"):
        hs = points(rows, HANDSHAKE, ebpf_flows__tcp__role=role)
        assert sum(p["count"] for p in hs) == r["normal"], (role, hs)
    assert sum(p["count"] for p in points(rows, DURATION)) == 2 * r["normal"] + 3
    # each is reported as a handshake no probe ran for; the kernel may also have skipped a
    # probe of the others on its own (what this telemetry is for): a lower bound
    unseen = total(rows, "ebpf_flows.probe.events.lost", ebpf_flows__probe__name="tcp_flows.unseen_handshake")
    assert 2 * r["unseen"] <= unseen <= 2 * n, (unseen, r["unseen"])
    syn_wait = total(rows, "ebpf_flows.probe.events.lost", ebpf_flows__probe__name="tcp_flows.syn_wait")
    assert syn_wait < r["unseen"], syn_wait  # found late is not counted as a missed SYN wait


def test_the_nested_copies_alone_count_every_event_exactly(run_scenario):
    """What the kernel skips for a main program interrupted on its CPU goes to the hook's nested
    copy (here a jump into the main program's code): with the main programs detached and every
    hook marked busy, the nested copies alone take every event, and every count is exact."""
    r = run_scenario("nested_copies_only")
    rows, mib, n, size = r["points"], r["mib"], r["connections"], r["size"]
    assert r["nested"] and all(name.endswith("_jump") for name in r["nested"]), r["nested"]
    assert len(r["nested"]) == len(r["mains"]) - 1, r  # probe has none
    assert total(rows, ATTEMPTS, ebpf_flows__tcp__role="client") == n == mib["Tcp.ActiveOpens"]
    # under loss the kernel may create a request's child twice (two CPUs completing it): the
    # loser is in PassiveOpens, never established, and counted apart by the probes
    assert total(rows, ATTEMPTS, ebpf_flows__tcp__role="server") == n == mib["Tcp.PassiveOpens"] - r["discarded"]
    assert total(rows, CLOSES, ebpf_flows__tcp__close__reason="normal") == total(rows, CLOSES) == 2 * n
    for role in ("client", "server"):
        assert sum(p["count"] for p in points(rows, HANDSHAKE, ebpf_flows__tcp__role=role)) == n, role
        for direction in ("transmit", "receive"):
            assert total(rows, IO, ebpf_flows__tcp__role=role, network__io__direction=direction) == n * size
    assert mib["Tcp.RetransSegs"] > 0, "10 % loss produced no retransmit: no test"
    assert total(rows, RETRANS) == mib["Tcp.RetransSegs"]
    # the client's, as its socket counted them (read once closed; the server's count can still
    # grow after it is read, with a FIN sent again from LAST_ACK)
    assert total(rows, RETRANS, ebpf_flows__tcp__role="client") == sum(c["client_retrans"] for c in r["closed"])
    # every state change of both ends (SYN_SENT or SYN_RECV, ESTABLISHED, two on the way down
    # and CLOSE), every socket destroyed (the listener's too) and the retransmits went through
    # the nested copies
    rescued = {name.replace("tp_btf_", "").replace("_nocast", "").replace("_err", ""): v
               for name, v in r["rescued"].items()}
    assert rescued["set_state"] >= 2 * 5 * n, rescued
    assert rescued["destroy_sock"] == 2 * n + 1 + r["discarded"], rescued
    assert rescued["retransmit_skb"] + rescued["retransmit_synack"] > 0, rescued
    lost = [p for p in points(rows, "ebpf_flows.probe.events.lost") if p["value"]]
    assert not lost, lost


def test_synack_retransmits_no_probe_ran_for_are_counted_from_the_accepted_socket(run_scenario):
    r = run_scenario("unseen_synacks")
    rows, mib = r["points"], r["mib"]
    assert len(r["detached"]) == 2, r["detached"]
    assert r["unseen"] > 0, "no SYN-ACK was retransmitted while the programs were detached: no test"
    server = sum(c["server_retrans"] for c in r["closed"])
    client = sum(c["client_retrans"] for c in r["closed"])
    # the accepted sockets' own counts (their requests' SYN-ACK retransmits), exactly
    assert total(rows, RETRANS, ebpf_flows__tcp__role="server") == server > r["unseen"]
    assert total(rows, RETRANS, ebpf_flows__tcp__role="client") == client
    assert total(rows, RETRANS) == mib["Tcp.RetransSegs"] == mib["TcpExt.TCPSynRetrans"] == server + client
    unseen = total(rows, "ebpf_flows.probe.events.lost", ebpf_flows__probe__name="tcp_flows.unseen_retransmit")
    assert r["unseen"] <= unseen <= server, (r["unseen"], unseen, server)
    assert r["balance"] == {"filter": 0, "tracked": 0}, r["balance"]
    # the repeated SYNs the lost SYN-ACKs caused are no overflow (the listener's drop count has them)
    assert total(rows, OVERFLOWS) == r["mib"]["TcpExt.ListenOverflows"] == 0
    assert total(rows, ATTEMPTS, ebpf_flows__tcp__role="server") == r["connections"] == mib["Tcp.PassiveOpens"]


def test_server_retransmits_from_softirq_are_the_servers(run_scenario):
    r = run_scenario("server_loss")
    rows, infos, peer_infos = r["points"], r["infos"], r["peer_infos"]
    ours = sum(i["total_retrans"] for i in infos)
    assert ours > 0, "5 % loss produced no server retransmit: no test"
    assert all(i["state"] == 7 for i in infos), "a server socket had not closed when read"
    counted = total(rows, RETRANS, ebpf_flows__tcp__role="server", network__local__port=5556)
    theirs = sum(i["total_retrans"] for i in peer_infos)
    exact(counted, ours, rows)
    # the namespace's RetransSegs is ours plus the other process's, exactly
    assert r["mib"]["Tcp.RetransSegs"] == ours + theirs, (counted, ours, theirs, r["mib"]["Tcp.RetransSegs"])
    assert total(rows, ATTEMPTS, ebpf_flows__tcp__role="server") == r["connections"] == r["mib"]["Tcp.PassiveOpens"]
    assert total(rows, IO, network__io__direction="receive") == r["payload"]
    assert total(rows, IO, network__io__direction="transmit") == r["payload"]
    assert not points(rows, ATTEMPTS, ebpf_flows__tcp__role="client"), "the client process's traffic leaked in"


def test_connection_attempts_and_failures(run_scenario):
    r = run_scenario("attempts")
    rows, mib = r["points"], r["mib"]
    assert r["errors"] == ["refused"] * r["refused"] + ["TimeoutError:110"]
    assert total(rows, ATTEMPTS, network__peer__port=5557) == r["ok"]
    assert points(rows, ATTEMPTS, network__peer__port=5557)[0]["attrs"].get("error.type") is None
    assert total(rows, ATTEMPTS, error__type="refused") == r["refused"]
    assert total(rows, ATTEMPTS, error__type="timed_out") == 1
    # every attempt in the namespace is ours but the other process's
    assert total(rows, ATTEMPTS) + r["other_connects"] == mib["Tcp.ActiveOpens"]
    assert total(rows, ATTEMPTS, error__type="refused") + total(rows, ATTEMPTS, error__type="timed_out") \
        == mib["Tcp.AttemptFails"]
    # the unanswered SYN's retransmits are counted, and are all the namespace's
    assert total(rows, RETRANS, network__peer__port=5559) == mib["TcpExt.TCPSynRetrans"] == mib["Tcp.RetransSegs"] > 0
    # the other process connected to 5560: none of it is ours
    assert not [p for p in rows if p["attrs"].get("network.peer.port") == 5560]
    # every socket, failed or not, forgotten and counted out of the owned-socket filter
    assert r["balance"] == {"filter": 0, "tracked": 0}, r["balance"]


def test_server_handshakes_and_listen_overflows(run_scenario):
    r = run_scenario("server_attempts")
    rows, mib = r["points"], r["mib"]
    assert total(rows, ATTEMPTS, network__local__port=5561) == 5
    assert total(rows, ATTEMPTS, ebpf_flows__tcp__role="server") == mib["Tcp.PassiveOpens"]
    assert mib["TcpExt.ListenOverflows"] > 0, "the flood did not overflow the queue: no test"
    assert total(rows, OVERFLOWS, network__local__port=5562) == mib["TcpExt.ListenOverflows"]
    assert all(set(p["attrs"]) == {"network.local.port"} for p in points(rows, OVERFLOWS))
    handshakes = points(rows, HANDSHAKE, ebpf_flows__tcp__role="server", network__local__port=5561)
    # the SYN wait of every accepted connection, but one whose request was not found in the accept
    # queue, which is counted instead (none in practice since the lookup walks the queue)
    syn_wait = sum(p["value"] for p in points(rows, "ebpf_flows.probe.events.lost",
                                               ebpf_flows__probe__name="tcp_flows.syn_wait"))
    assert handshakes and handshakes[0]["count"] + syn_wait == 5, (handshakes, syn_wait)
    assert 0 < handshakes[0]["max"] < 0.5


def test_a_server_accepting_in_a_busy_loop_times_every_syn_wait(run_scenario):
    """accept() on another CPU can take a request off the accept queue before its child's
    ESTABLISHED (about 1 in 60 here): the SYN wait then comes from the child's first RTT sample,
    which the kernel took from that request. Every one of the 1,500 is timed, and each point is
    at least its socket's TCP_INFO RTT (the same interval, in whole us, taken a little earlier)."""
    r = run_scenario("accept_race")
    rows, rtts, n = r["points"], r["rtts_us"], r["n"]
    assert r["mib"]["Tcp.PassiveOpens"] == len(rtts) == n and r["retransmitted"] == [], r["mib"]
    syn_wait = total(rows, "ebpf_flows.probe.events.lost", ebpf_flows__probe__name="tcp_flows.syn_wait")
    handshakes = points(rows, HANDSHAKE, ebpf_flows__tcp__role="server", network__local__port=5571)
    assert len(handshakes) == 1 and handshakes[0]["count"] == n and syn_wait == 0, (handshakes, syn_wait)
    point = handshakes[0]
    # each point >= its RTT (us, truncated) and at most a few us more: the tracepoint runs
    # after the kernel's sample, in the same softirq
    assert sum(rtts) / 1e6 <= point["sum"] <= (sum(rtts) + 10 * n) / 1e6, (point, sum(rtts))
    assert point["min"] >= min(rtts) / 1e6 and point["max"] >= max(rtts) / 1e6, (point, min(rtts), max(rtts))


def test_listen_overflows_are_the_kernels_overflows_whatever_else_the_listener_drops(run_scenario):
    """Per listener, exactly ListenOverflows: a SYN to a full accept queue, a request's final ACK to
    a full queue (the kernel charges the listener's drop count twice), a SYN-cookie ACK to a full
    queue; and none for repeated SYNs of held requests or stray segments, which that count also
    takes (the kfree_skb program takes them off)."""
    r = run_scenario("listener_drops")
    rows, phases, ports, sk_drops = r["points"], r["phases"], r["ports"], r["sk_drops"]
    assert "tp_btf_kfree_skb" in r["attached"], r["attached"]
    for phase, port in ports.items():
        want = phases[phase]["TcpExt.ListenOverflows"]
        assert total(rows, OVERFLOWS, network__local__port=port) == want, (phase, want, sk_drops[phase])
    # each kind happened, and the listener's drop count alone would be wrong where it should
    assert phases["syn"]["TcpExt.ListenOverflows"] == sk_drops["syn"] > 0
    assert phases["cookie"]["TcpExt.SyncookiesRecv"] > 0 and phases["cookie"]["TcpExt.ListenOverflows"] > 0
    assert sk_drops["final_ack"] == 2 * phases["final_ack"]["TcpExt.ListenOverflows"] > 0
    assert phases["repeated"]["TcpExt.ListenOverflows"] == 0 < sk_drops["repeated"]
    assert phases["stray"]["TcpExt.ListenOverflows"] == 0 < sk_drops["stray"] == 3  # RST, SYN+FIN, none
    assert all(set(p["attrs"]) == {"network.local.port"} for p in points(rows, OVERFLOWS))


def test_resets_both_ways(run_scenario):
    r = run_scenario("resets")
    rows, mib = r["points"], r["mib"]
    sent = total(rows, RESETS, network__io__direction="transmit")
    received = total(rows, RESETS, network__io__direction="receive")
    assert (sent, received) == (1, 2)
    # every RST in the namespace is one we sent or one sent to us
    assert mib["Tcp.OutRsts"] == sent + received
    assert total(rows, CLOSES, ebpf_flows__tcp__close__reason="reset_sent", network__peer__port=5565) == 1
    assert total(rows, CLOSES, ebpf_flows__tcp__close__reason="reset_received", network__peer__port=5563) == 1
    # each reset established connection counts on both of its ends
    assert mib["Tcp.EstabResets"] == 2 * (
        total(rows, CLOSES, ebpf_flows__tcp__close__reason="reset_sent")
        + total(rows, CLOSES, ebpf_flows__tcp__close__reason="reset_received"))
    assert total(rows, ATTEMPTS, error__type="refused") == mib["Tcp.AttemptFails"] == 1
    assert r["balance"] == {"filter": 0, "tracked": 0}, r["balance"]


def test_live_bytes_rtt_and_window_scaling(run_scenario):
    r = run_scenario("bytes_rtt_wscale")
    info, base = r["info"], r["base"]
    for rows in (r["first"], r["second"]):
        assert total(rows, IO, network__io__direction="transmit") == info["bytes_acked"] - base["bytes_acked"] == r["sent"]
        assert total(rows, IO, network__io__direction="receive") == info["bytes_received"] - base["bytes_received"]
        assert total(rows, ACTIVE) == 1
    # window scaling off in the namespace: TCP_INFO agrees, and it is counted
    assert not info["options"] & 4
    assert total(r["second"], WSCALE) == 1
    # RTT samples taken while idle equal tcpi_rtt exactly
    a = points(r["first"], RTT)[0]
    b = points(r["second"], RTT)[0]
    assert b["count"] - a["count"] >= 2
    mean = (b["sum"] - a["sum"]) / (b["count"] - a["count"])
    assert abs(mean - info["rtt_us"] / 1e6) < 1e-9


def test_zero_windows_both_ways(run_scenario):
    r = run_scenario("zero_window")
    assert r["rx_mib"]["TcpExt.TCPToZeroWindowAdv"] > 0, "the peer never advertised a zero window: no test"
    assert total(r["rx_points"], ZERO, network__io__direction="receive") == r["rx_mib"]["TcpExt.TCPToZeroWindowAdv"]
    assert total(r["rx_points"], ZERO, network__io__direction="transmit") == 0
    assert r["tx_mib"]["TcpExt.TCPToZeroWindowAdv"] > 0, "we never advertised a zero window: no test"
    rows = r["points"]
    assert total(rows, ZERO, network__io__direction="transmit") == r["tx_mib"]["TcpExt.TCPToZeroWindowAdv"]
    assert total(rows, ZERO, network__io__direction="receive") == r["rx_mib"]["TcpExt.TCPToZeroWindowAdv"]
    # the stalled socket is marked while the peer's window is zero; every mark set
    # was cleared or forgotten with its socket: segments of open windows skip the
    # socket lookup again (tcp_probe's shortcut)
    assert max(r["marks_in_stall"]) == 1
    assert r["zero_win_marks"] == 0


def test_a_zero_window_whose_start_no_program_saw_is_caught_at_the_next_segment(run_scenario):
    """tcp_probe has no nested copy: a segment the kernel skipped it for is caught up at the
    connection's next one, because the program re-reads the window from each segment."""
    r = run_scenario("zero_window_caught_up")
    assert r["detached"] == ["tp_btf_probe"], r["detached"]  # this kernel's build; no nested copy
    assert r["marks_detached"] == 0  # the episode started with no program to see it
    assert max(r["marks_in_stall"]) == 1, r["marks_in_stall"]  # found with the program back
    assert r["mib"]["TcpExt.TCPToZeroWindowAdv"] > 0
    assert total(r["points"], ZERO, network__io__direction="receive") == r["mib"]["TcpExt.TCPToZeroWindowAdv"]
    assert r["zero_win_marks"] == 0


def test_durations_and_timeout_close(run_scenario):
    r = run_scenario("durations_timeout")
    rows = r["points"]
    assert r["timeout_errno"] == 110
    d = points(rows, DURATION, network__peer__port=5569)[0]
    assert d["count"] == 2
    assert 0.3 <= d["min"] < 0.4 and 0.6 <= d["max"] < 0.7  # what the test held, plus the FIN exchange
    assert total(rows, CLOSES, network__peer__port=5569, ebpf_flows__tcp__close__reason="normal") == 2
    assert total(rows, CLOSES, network__peer__port=5570, ebpf_flows__tcp__close__reason="timeout") == 1
    assert total(rows, RETRANS, network__peer__port=5570) > 0
    assert total(rows, ACTIVE) == 0


def test_connection_opened_before_instrument(run_scenario):
    r = run_scenario("preexisting")
    expected = r["info"]["bytes_acked"] - r["base"]["bytes_acked"]
    assert expected == r["sent_after"]
    for rows in (r["live"], r["closed"]):
        assert total(rows, IO, network__io__direction="transmit") == expected
        assert total(rows, IO, network__io__direction="receive") == r["info"]["bytes_received"] - r["base"]["bytes_received"]
    assert total(r["live"], ACTIVE) == 1
    assert total(r["closed"], ACTIVE) == 0
    assert total(r["closed"], CLOSES, ebpf_flows__tcp__close__reason="normal") == 1


def test_peers_beyond_the_kernel_map_fold_without_loss(run_scenario):
    r = run_scenario("flows_overflow")
    rows, mib = r["points"], r["mib"]
    assert total(rows, ATTEMPTS) == r["peers"] == mib["Tcp.ActiveOpens"]
    named = {p["attrs"]["network.peer.address"] for p in points(rows, ATTEMPTS)}
    assert "_OTHER" in named and len(named) == 16 + 1  # what the map held, plus the overflow series
    folded = [p for p in rows if p["name"] == "ebpf_flows.probe.map.evictions"
              and p["attrs"]["ebpf_flows.probe.name"] == "tcp_flows.flows"]
    assert folded and folded[0]["value"] > 0, "the overflow is not visible in self-telemetry"
    assert total(rows, IO, network__io__direction="transmit") == r["peers"]
    # the histograms the kernel aggregates fold alike (their map holds as many peers): no point lost
    for name in (HANDSHAKE, DURATION):
        assert sum(p["count"] for p in points(rows, name)) == r["peers"], name
        assert {p["attrs"]["network.peer.address"] for p in points(rows, name)} == named, name
    hists = [p for p in rows if p["name"] == "ebpf_flows.probe.map.evictions"
             and p["attrs"]["ebpf_flows.probe.name"] == "tcp_flows.hists"]
    # for each of the 14 peers that did not fit: one fold at its handshake, one at its close
    # (duration and RTT together)
    assert hists and hists[0]["value"] == 2 * (r["peers"] - 16), "the histograms' overflow is not in self-telemetry"
    # a handshake folded into the overflow series takes no exemplar of its peer's: its CONN span
    # record says "not in the kernel" (the 16 the map held: "in the kernel")
    assert len(r["in_kernel"]) == r["peers"], r["in_kernel"]
    assert sorted(r["in_kernel"].values()) == [False] * (r["peers"] - 16) + [True] * 16, r["in_kernel"]


def test_raw_tp_fallback_counts_the_same(run_scenario):
    r = run_scenario("raw_tp_variant")
    assert r["variant"] == "raw_tp" and all(name.startswith("raw_tp_") for name in r["attached"])
    c = r["counters"]
    assert c["client:5574"]["attempts_ok"] == 3 == c["client:5574"]["closed"]
    assert c["client:5574"]["bytes_tx"] == sum(r["tcpi_bytes"]) == 15000
    assert c["client:5575"]["refused"] == 1 == r["mib"]["Tcp.AttemptFails"]
    assert r["mib"]["Tcp.ActiveOpens"] == 4


def test_a_child_closed_before_established_is_no_completed_handshake(run_scenario):
    # PassiveOpens counts a socket the kernel created for a request even if it never
    # becomes established; the probes count such children apart (the soak's
    # reconciliation: server attempts = PassiveOpens - discarded children)
    r = run_scenario("discarded_child")
    mib, rows = r["mib"], r["points"]
    assert r["saw_syn_recv"] and mib["TcpExt.TCPFastOpenPassive"] == 1, "no Fast Open child: no test"
    assert mib["Tcp.PassiveOpens"] == 1
    assert r["discarded"] == 1
    assert total(rows, ATTEMPTS, ebpf_flows__tcp__role="server") == mib["Tcp.PassiveOpens"] - r["discarded"] == 0
    assert total(rows, CLOSES, ebpf_flows__tcp__role="server") == 0
    assert total(rows, ATTEMPTS, ebpf_flows__tcp__role="client") == mib["Tcp.ActiveOpens"] == 1
    assert total(rows, ACTIVE) == 0


def test_ipv6_connections_and_an_ipv4_mapped_peer(run_scenario):
    """IPv6 on both ends (::1), and an IPv4 client of a dual-stack listener, whose accepted socket is
    IPv6 with an IPv4-mapped peer: that peer is named as IPv4, as the client end names it."""
    r = run_scenario("ipv6")
    rows, mib, n, size = r["points"], r["mib"], r["n"], r["size"]
    v6 = {"network__type": "ipv6", "network__peer__address": "::1"}
    v4 = {"network__type": "ipv4", "network__peer__address": "127.0.0.1"}
    assert total(rows, ATTEMPTS, ebpf_flows__tcp__role="client", network__peer__port=5594, **v6) == n
    assert total(rows, ATTEMPTS, ebpf_flows__tcp__role="server", network__local__port=5594, **v6) == n
    assert total(rows, ATTEMPTS, ebpf_flows__tcp__role="client", network__peer__port=5595, **v4) == 1
    assert total(rows, ATTEMPTS, ebpf_flows__tcp__role="server", network__local__port=5595, **v4) == 1
    assert total(rows, ATTEMPTS, ebpf_flows__tcp__role="client") == mib["Tcp.ActiveOpens"] == n + 1
    assert total(rows, ATTEMPTS, ebpf_flows__tcp__role="server") == mib["Tcp.PassiveOpens"] == n + 1
    for role in ("client", "server"):
        for direction in ("transmit", "receive"):
            assert total(rows, IO, ebpf_flows__tcp__role=role, network__io__direction=direction, **v6) == n * size
            assert total(rows, IO, ebpf_flows__tcp__role=role, network__io__direction=direction, **v4) == size
        assert sum(p["count"] for p in points(rows, HANDSHAKE, ebpf_flows__tcp__role=role, **v6)) == n
    assert total(rows, CLOSES, ebpf_flows__tcp__close__reason="normal") == total(rows, CLOSES) == 2 * (n + 1)
    assert total(rows, ACTIVE) == 0
    assert r["balance"] == {"filter": 0, "tracked": 0}, r["balance"]


def test_a_socket_reusing_the_memory_of_one_whose_end_went_unseen_is_a_new_connection(run_scenario):
    # An entry left by a socket whose CLOSE and destruction no program saw must not be
    # taken for the new socket the kernel makes in the same memory: the new one's
    # attempt, handshake and close are its own, the old one's close is counted (_OTHER).
    r = run_scenario("unseen_ends_then_reused")
    rows, mib, n = r["points"], r["mib"], r["old"] + r["new"]
    assert len(r["detached"]) == 4, r["detached"]  # set_state and destroy_sock, main and nested
    assert r["stale"] >= 2 * r["old"], r  # both ends of each old connection (and the listener)
    assert total(rows, ATTEMPTS, ebpf_flows__tcp__role="client") == n == mib["Tcp.ActiveOpens"]
    assert total(rows, ATTEMPTS, ebpf_flows__tcp__role="server") == n == mib["Tcp.PassiveOpens"]
    assert r["tracked_new"] == 2 * r["new"], r  # every new socket has an entry of its own
    assert r["reused"] > 0, "no new socket got the memory of an old one: no test"
    # the old connections' closes: found at the reuse of their memory or by the sweep
    assert total(rows, CLOSES, ebpf_flows__tcp__close__reason="_OTHER") == 2 * r["old"]
    unseen = total(rows, "ebpf_flows.probe.events.lost", ebpf_flows__probe__name="tcp_flows.unseen_close")
    assert unseen == 2 * r["old"], unseen
    assert total(rows, CLOSES, ebpf_flows__tcp__close__reason="normal") == 2 * r["new"]
    assert total(rows, ACTIVE) == 0
    assert total(rows, RETRANS) == mib["Tcp.RetransSegs"] == 0


def test_a_fin_sent_while_no_program_ran_is_no_byte(run_scenario):
    # The kernel counts an acknowledged FIN in bytes_acked. The end that closes first sent
    # its FIN (and saw it acknowledged) while no set_state program ran: its bytes are still
    # the payload, the FIN told from the state the socket closes from, exactly TCP_INFO's.
    r = run_scenario("unseen_fins")
    rows, mib, n, size = r["points"], r["mib"], r["n"], r["size"]
    assert len(r["detached"]) == 2, r["detached"]  # set_state, main and nested copy
    assert mib["Tcp.ActiveOpens"] == mib["Tcp.PassiveOpens"] == 2 * n
    payload = 2 * n * size
    # TCP_INFO: the clients' SYNs (2n) and the first ends' FINs (2n) are in bytes_acked too
    assert r["acked"] == r["received"] == 2 * payload + 4 * n
    for role in ("client", "server"):
        for direction in ("transmit", "receive"):
            assert total(rows, IO, ebpf_flows__tcp__role=role, network__io__direction=direction) == payload, \
                (role, direction)
    assert total(rows, CLOSES, ebpf_flows__tcp__close__reason="normal") == total(rows, CLOSES) == 4 * n
    assert total(rows, ACTIVE) == 0


def test_a_socket_connected_again_after_a_disconnect_counts_both_connections(run_scenario):
    r = run_scenario("reconnect_after_disconnect")
    rows, mib = r["points"], r["mib"]
    assert mib["Tcp.ActiveOpens"] == 2 == mib["Tcp.PassiveOpens"]
    assert total(rows, ATTEMPTS, ebpf_flows__tcp__role="client") == 2
    assert total(rows, ATTEMPTS, ebpf_flows__tcp__role="server") == 2
    # the first ended by our RST (the disconnect), the second normally
    assert total(rows, CLOSES, ebpf_flows__tcp__role="client", ebpf_flows__tcp__close__reason="reset_sent") == 1
    assert total(rows, CLOSES, ebpf_flows__tcp__role="client", ebpf_flows__tcp__close__reason="normal") == 1
    assert total(rows, IO, ebpf_flows__tcp__role="client", network__io__direction="transmit") == 3000
    assert total(rows, ACTIVE) == 0


def test_histograms_aggregated_in_the_kernel_equal_the_records_of_the_same_connections(run_scenario):
    """240 connections (3 % loss), each histogram value both aggregated in the kernel and handed
    over as a record: bucket counts, minimum and maximum per peer and histogram are exactly those
    of the records, sums equal up to float rounding; the counts are the namespace's own."""
    r = run_scenario("kernel_histograms")
    assert r["first"] == 4 and r["mode"] == 7  # bounds first, then the histograms
    assert r["unknown_extremes"] == 0  # no read met a value half written here (reads between connections)
    assert r["lost"] == 0
    user, kernel = r["user"], r["kernel"]
    assert set(kernel) == set(user) and user, (sorted(kernel), sorted(user))
    for name, want in user.items():
        have = kernel[name]
        assert have["counts"] == want["counts"], name
        assert (have["min"], have["max"]) == (want["min"], want["max"]), name
        assert math.isclose(have["sum"], want["sum"], rel_tol=1e-9), name
    handshakes = sum(sum(v["counts"]) for k, v in kernel.items() if k.startswith("handshake:client"))
    assert handshakes == r["mib"]["Tcp.ActiveOpens"] == 240
    # every socket's lifetime, but one no probe saw close or saw established (counted, and given
    # no duration point either way: the kernel can skip a program, see tcp_flows.skipped)
    unseen = r["unseen"]["tcp_flows.unseen_close"] + r["unseen"]["tcp_flows.unseen_handshake"]
    durations = sum(sum(v["counts"]) for k, v in kernel.items() if k.startswith("duration:"))
    assert durations + unseen == 480, (durations, r["unseen"])
    # the values spread over several buckets of each histogram (not one bucket compared)
    for hist in ("handshake", "duration", "rtt"):
        used = {i for k, v in kernel.items() if k.startswith(hist) for i, c in enumerate(v["counts"]) if c}
        assert len(used) >= 2, (hist, used)
