"""The node agent without the kernel: Resources from environments, container ids from real
cgroup lines, selectors, the wire protocol, the span socket's permissions and refusals, and the
in-process client against a scripted agent on a real Unix socket (dead, slow, garbage)."""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import sys
import threading
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk import resources as sdk_resources

from otel_ebpf_flows import _agent, _instrumentor, _kernel
from otel_ebpf_flows import _agent_protocol as proto
from otel_ebpf_flows._agent import Selector, build_resource_attributes, container_id, parse_resource_attributes
from otel_ebpf_flows._agent_client import AgentClient
from otel_ebpf_flows._config import Config
from otel_ebpf_flows._source import CONN_EVENT_KINDS, FlowEvent, FlowKey, Role

ID = "3f9a0c6e1d2b4a5968778695a4b3c2d1e0f1a2b3c4d5e6f708192a3b4c5d6e7f"

# -- Resource ------------------------------------------------------------------------------------


def sdk_parse(monkeypatch: pytest.MonkeyPatch, text: str) -> Dict[str, Any]:
    """What the OpenTelemetry SDK itself makes of OTEL_RESOURCE_ATTRIBUTES."""
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", text)
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    return dict(sdk_resources.OTELResourceDetector().detect().attributes)


@pytest.mark.parametrize("text", [
    "service.name=checkout,deployment.environment.name=prod",
    " service.name = checkout , team=payments ",
    "k8s.pod.name=web%2D1,note=a%20b%2Cc,pct=100%25",
    "url=http://x/?a=b=c",
    "a=1,,b=2",
    "noequals,b=2",
    "",
    "a=",
    "k=%E2%82%AC",
])
def test_resource_attributes_are_parsed_as_the_sdk_parses_them(monkeypatch, text):
    assert parse_resource_attributes(text) == sdk_parse(monkeypatch, text)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab.=, %2C0x\t", max_size=40))
def test_resource_attributes_match_the_sdk_on_arbitrary_text(text):
    with pytest.MonkeyPatch.context() as mp:
        expected = {k: v for k, v in sdk_parse(mp, text).items() if k}  # the agent drops an empty key
    assert parse_resource_attributes(text) == expected


def test_declared_service():
    assert _agent.declared_service({"OTEL_SERVICE_NAME": "a"}) == "a"
    assert _agent.declared_service({"OTEL_RESOURCE_ATTRIBUTES": "x=1,service.name=b"}) == "b"
    assert _agent.declared_service({"OTEL_SERVICE_NAME": "a", "OTEL_RESOURCE_ATTRIBUTES": "service.name=b"}) == "a"
    assert _agent.declared_service({"OTEL_SERVICE_NAME": "", "OTEL_RESOURCE_ATTRIBUTES": "team=x"}) is None
    assert _agent.declared_service({"PATH": "/bin"}) is None


def test_the_resource_of_a_process():
    environ = {"OTEL_SERVICE_NAME": "checkout",
               "OTEL_RESOURCE_ATTRIBUTES": "service.name=ignored,service.namespace=shop,deployment.environment.name=prod"}
    attrs = build_resource_attributes(42, environ, f"0::/system.slice/docker-{ID}.scope\n", "node-1", "python3")
    assert attrs == {"service.name": "checkout", "service.namespace": "shop", "deployment.environment.name": "prod",
                     "process.pid": 42, "host.name": "node-1", "container.id": ID}


def test_a_selected_process_without_a_service_name_is_unknown_service_by_its_name():
    attrs = build_resource_attributes(7, {}, "0::/user.slice/session-2.scope\n", "h", "nginx")
    assert attrs == {"service.name": "unknown_service:nginx", "process.pid": 7, "host.name": "h"}


# Real /proc/PID/cgroup contents, by runtime and cgroup driver.
CGROUPS = {
    "docker, cgroup v1": f"12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n0::/\n",
    "docker, cgroup v2, systemd driver": f"0::/system.slice/docker-{ID}.scope\n",
    "docker, cgroup v2, cgroupfs driver": f"0::/docker/{ID}\n",
    "kubernetes + containerd, systemd driver": (
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0b7e3c8a_5d2f_4c1e_9a7b_"
        f"6f2d1e0c9b8a.slice/cri-containerd-{ID}.scope\n"),
    "kubernetes + cri-o": ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1c2d3e4f_aaaa_"
                           f"bbbb_cccc_ddddeeeeffff.slice/crio-{ID}.scope\n"),
    "kubernetes, cgroup v1, cgroupfs driver": (
        f"11:memory:/kubepods/besteffort/pod0b7e3c8a-5d2f-4c1e-9a7b-6f2d1e0c9b8a/{ID}\n"
        f"10:cpu,cpuacct:/kubepods/besteffort/pod0b7e3c8a-5d2f-4c1e-9a7b-6f2d1e0c9b8a/{ID}\n"),
    "podman, rootful": f"0::/machine.slice/libpod-{ID}.scope/container\n",
    "podman, rootless": f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope\n",
}
NOT_CONTAINERS = {
    "a systemd service": "0::/system.slice/nginx.service\n",
    "a login session": "0::/user.slice/user-1000.slice/session-3.scope\n",
    "the root cgroup": "0::/\n",
    "this machine's own": "4:memory:/process_api/7359c8de7054fb435907149660e90851\n0::/\n",
    "docker's daemon": "0::/system.slice/docker.service\n",
    "podman's container monitor": f"0::/machine.slice/libpod-conmon-{ID}.scope\n",
    "a pod's slice": "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0b7e3c8a.slice\n",
    "63 hex digits": f"0::/docker/{ID[:63]}\n",
}


@pytest.mark.parametrize("text", list(CGROUPS.values()), ids=list(CGROUPS))
def test_container_id_from_real_cgroup_lines(text):
    assert container_id(text) == ID


@pytest.mark.parametrize("text", list(NOT_CONTAINERS.values()), ids=list(NOT_CONTAINERS))
def test_no_container_id_outside_containers(text):
    assert container_id(text) is None


def test_the_container_id_of_this_process_does_not_crash():
    with open("/proc/self/cgroup") as f:
        found = container_id(f.read())
    assert found is None or len(found) == 64


# -- selectors -------------------------------------------------------------------------------------


def test_selectors():
    cg = "0::/system.slice/app.service\n"
    declared = {"OTEL_SERVICE_NAME": "x"}
    assert Selector().matches(1, declared, cg, "python3", "python3.11")
    assert not Selector().matches(1, {}, cg, "python3", "python3.11")
    assert not Selector(declared=False).matches(1, declared, cg, "python3", "python3.11")
    assert Selector(declared=False, pids=(1,)).matches(1, {}, cg, "c", "e")
    assert not Selector(declared=False, pids=(2,)).matches(1, {}, cg, "c", "e")
    assert Selector(declared=False, names=("e",)).matches(1, {}, cg, "c", "e")
    assert Selector(declared=False, names=("c",)).matches(1, {}, cg, "c", "e")
    assert Selector(declared=False, cgroups=("/system.slice/app.service",)).matches(1, {}, cg, "c", "e")
    assert Selector(declared=False, cgroups=("/system.slice",)).matches(1, {}, cg, "c", "e")
    assert Selector(declared=False, cgroups=("/system.slice/",)).matches(1, {}, cg, "c", "e")
    assert not Selector(declared=False, cgroups=("/system.slice/app",)).matches(1, {}, cg, "c", "e")  # a sibling
    assert not Selector(declared=False, cgroups=("/user.slice",)).matches(1, {}, cg, "c", "e")


def test_proc_starttime_names_a_process():
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    assert _agent.proc_starttime(os.getpid()) == int(fields[19])
    assert _agent.proc_starttime(2 ** 22 + 1) is None  # above pid_max: no such process
    assert _agent.read_environ(os.getpid())["PATH"] == os.environ["PATH"]


def test_a_thread_of_another_process_is_not_the_peers():
    assert _agent.host_tid(os.getpid(), threading.get_native_id()) == threading.get_native_id()
    assert _agent.host_tid(os.getpid(), 1) is None  # pid 1's thread, not ours
    assert _agent.host_tid(os.getpid(), 0) is None


# -- protocol ---------------------------------------------------------------------------------------

events = st.builds(
    FlowEvent,
    kind=st.sampled_from(sorted(CONN_EVENT_KINDS)),
    key=st.builds(FlowKey, role=st.sampled_from(list(Role)), address=st.one_of(st.none(), st.text(max_size=20)),
                  port=st.integers(0, 65535), family=st.sampled_from(["ipv4", "ipv6", ""])),
    ts_ns=st.integers(0, 2 ** 63), duration_s=st.floats(0, 1e6), srtt_s=st.one_of(st.none(), st.floats(0, 100)),
    tid=st.integers(0, 2 ** 31), conn_id=st.integers(0, 2 ** 64 - 1), peer_port=st.integers(0, 65535),
    direction=st.one_of(st.none(), st.sampled_from(["transmit", "receive"])), count=st.integers(0, 2 ** 32),
    adopted=st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(events, max_size=20), st.integers(0, 1000))
def test_events_survive_the_wire(evs, lost):
    frame = proto.encode_frame(proto.EVENTS, {"events": [proto.encode_event(e) for e in evs], "lost": lost})
    kind, payload = proto.decode_frame(frame)
    assert kind == proto.EVENTS
    assert proto.decode_events(payload) == (evs, lost)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_is_a_protocol_error_never_a_crash(data):
    try:
        proto.decode_frame(data)
    except proto.ProtocolError:
        pass


@pytest.mark.parametrize(("data", "says"), [
    (b"", "truncated header"),
    (b"\x01\x82\x00", "truncated header"),
    (b"\x02\x82\x00\x00\x00\x02{}", "version 2"),
    (b"\x01\x42\x00\x00\x00\x02{}", "unknown frame type"),
    (b"\x01\x82\xff\xff\xff\xff", "exceeds"),
    (b"\x01\x82\x00\x00\x00\x05{}", "says 5 payload bytes, has 2"),
    (b"\x01\x82\x00\x00\x00\x02[]", "expected an object"),
    (b"\x01\x82\x00\x00\x00\x02\xff\xfe", "not UTF-8 JSON"),
])
def test_bad_frames_say_what_is_wrong(data, says):
    with pytest.raises(proto.ProtocolError, match=says):
        proto.decode_frame(data)


@pytest.mark.parametrize("payload", [
    {"events": "no"}, {"events": [[1, 2]]}, {"events": [["handshake", "client", None, 1, "", 1, 0, None, 0, 1, 0,
                                                        None, 0, False]]},
    {"events": [["conn", "boss", None, 1, "", 1, 0, None, 0, 1, 0, None, 0, False]]},
    {"events": [["conn", "client", None, -1, "", 1, 0, None, 0, 1, 0, None, 0, False]]},
    {"events": [["conn", "client", None, 1, "", 1, 0, None, 0, 1, 0, None, 0, "yes"]]},
    {"events": [], "lost": -1},
])
def test_bad_events_are_refused(payload):
    with pytest.raises(proto.ProtocolError):
        proto.decode_events(payload)


@pytest.mark.parametrize("payload", [{}, {"slots": [[1, 2]]}, {"slots": [[1, 2, "x"]]}, {"slots": [[True, 1, 1]]}])
def test_bad_slots_are_refused(payload):
    with pytest.raises(proto.ProtocolError):
        proto.decode_slots(payload)


def test_a_frame_cut_short_on_a_socket():
    a, b = socket.socketpair()
    with a, b:
        frame = proto.encode_frame(proto.DRAIN, {})
        b.sendall(frame[:-1])
        b.shutdown(socket.SHUT_WR)
        with pytest.raises(proto.ProtocolError, match="mid-frame"):
            proto.read_frame(a)
    a, b = socket.socketpair()
    with a, b:
        b.close()
        with pytest.raises(EOFError):
            proto.read_frame(a)


# -- the span socket ----------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path) -> Iterator[_agent.SpanServer]:
    if os.geteuid() != 0:
        pytest.skip("giving the socket to another group needs root")
    path = str(tmp_path / "run" / "agent.sock")
    s = _agent.SpanServer(path, "65534", Config())
    s.start()
    yield s
    s.stop()


def test_the_socket_is_0660_for_root_and_the_group_in_a_0755_directory(server):
    st_sock = os.stat(server.path)
    assert stat.S_ISSOCK(st_sock.st_mode) and stat.S_IMODE(st_sock.st_mode) == 0o660
    assert (st_sock.st_uid, st_sock.st_gid) == (0, 65534)
    assert stat.S_IMODE(os.stat(os.path.dirname(server.path)).st_mode) == 0o755


def test_an_unknown_group_is_a_configuration_error(tmp_path):
    with pytest.raises(_agent.ConfigurationError, match="no such group"):
        _agent.SpanServer(str(tmp_path / "a.sock"), "no-such-group-here", Config()).start()


def _ask(path: str, data: bytes) -> Tuple[int, Dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(30)
        c.connect(path)
        c.sendall(data)
        return proto.read_frame(c)


def test_requests_before_hello_and_garbage_get_an_error_and_the_server_goes_on(server):
    kind, payload = _ask(server.path, proto.encode_frame(proto.DRAIN, {}))
    assert kind == proto.ERROR and "HELLO" in payload["error"]
    kind, payload = _ask(server.path, b"\x09" * 64)
    assert kind == proto.ERROR and "version 9" in payload["error"]
    kind, payload = _ask(server.path, proto.encode_frame(proto.EVENTS, {"events": []}))
    assert kind == proto.ERROR and "not a request" in payload["error"]
    kind, payload = _ask(server.path, proto.encode_frame(proto.THREADS, {"tid": 1}))
    assert kind == proto.ERROR  # still answering


def test_stop_removes_the_socket(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    path = str(tmp_path / "agent.sock")
    s = _agent.SpanServer(path, None, Config())
    s.start()
    assert os.path.exists(path)
    s.stop()
    assert not os.path.exists(path)


# -- the in-process client against a scripted agent ---------------------------------------------------

EVENT = FlowEvent(kind="retransmit", key=FlowKey(Role.CLIENT, "10.0.0.1", 443, "ipv4"), ts_ns=5, duration_s=0.0,
                  srtt_s=None, conn_id=9, count=2)


class ScriptedAgent:
    """A Unix socket server answering each request with ``answer(kind, payload)``; ``hold`` delays
    replies until released (no timing in the tests: the test releases it)."""

    def __init__(self, path: str, answer: Callable[[int, Dict[str, Any]], bytes]) -> None:
        self.path = path
        self.answer = answer
        self.hold = threading.Event()
        self.hold.set()
        self.requests: List[int] = []
        self.hello_pids: List[int] = []  # SO_PEERCRED of each HELLO
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    kind, payload = proto.read_frame(conn)
                except (EOFError, OSError, proto.ProtocolError):
                    return
                self.requests.append(kind)
                if kind == proto.HELLO:
                    cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                    self.hello_pids.append(struct.unpack("3i", cred)[0])
                self.hold.wait(30)
                try:
                    conn.sendall(self.answer(kind, payload))
                except OSError:
                    return

    def close(self) -> None:
        self.sock.close()


def normal(kind: int, payload: Dict[str, Any]) -> bytes:
    if kind == proto.HELLO:
        return proto.encode_frame(proto.WELCOME, {"pid": os.getpid(), "tracks_threads": True})
    if kind == proto.DRAIN:
        return proto.encode_frame(proto.EVENTS, {"events": [proto.encode_event(EVENT)], "lost": 1})
    return proto.encode_frame(proto.SLOTS, {"slots": [[9, 100, 250]]})


@pytest.fixture
def agent_at(tmp_path) -> Iterator[Callable[..., ScriptedAgent]]:
    made: List[ScriptedAgent] = []

    def make(answer: Callable[[int, Dict[str, Any]], bytes] = normal) -> ScriptedAgent:
        a = ScriptedAgent(str(tmp_path / f"agent{len(made)}.sock"), answer)
        made.append(a)
        return a

    yield make
    for a in made:
        a.hold.set()
        a.close()


def test_the_client_delivers_events_and_slots(agent_at):
    agent = agent_at()
    got: List[FlowEvent] = []
    client = AgentClient(agent.path, got.append)
    client.connect()
    assert client.tracks_threads
    client.drain_conn_events()
    assert got == [EVENT] and client.lost == 1
    assert client.thread_connections(123) == [(9, 100, 250)]
    client.close()


def test_a_slow_agent_costs_a_span_nothing_but_its_attributes_and_no_record_is_lost(agent_at):
    agent = agent_at()
    got: List[FlowEvent] = []
    client = AgentClient(agent.path, got.append, timeout=0.05)
    client.connect()
    agent.hold.clear()  # the agent stops answering
    client.drain_conn_events()
    assert got == []  # gave up after its timeout, did not wait for the agent
    assert client.thread_connections(1) == []
    assert client.connected  # still connected: the replies are owed, not lost
    agent.hold.set()
    # the next request first takes the late replies: the late DRAIN's records are delivered
    client.timeout = 30.0
    assert client.thread_connections(1) == [(9, 100, 250)]
    assert got == [EVENT]
    client.close()


def test_a_dead_agent_means_one_warning_and_unenriched_spans(tmp_path, caplog):
    path = str(tmp_path / "gone.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the path exists; nobody listens
    caplog.set_level(logging.WARNING)
    client = AgentClient(path)
    assert client.reconnect() is False
    assert client.reconnect() is False  # within the backoff: not even tried
    client.drain_conn_events()
    assert client.thread_connections(1) == []
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and path in warnings[0].getMessage() and "Fix" in warnings[0].getMessage()


def test_garbage_from_the_agent_is_a_warning_not_an_exception(agent_at, caplog):
    def garbage(kind: int, payload: Dict[str, Any]) -> bytes:
        if kind == proto.HELLO:
            return normal(kind, payload)
        return proto.encode_frame(proto.EVENTS, {"events": [["nonsense"]]})

    agent = agent_at(garbage)
    client = AgentClient(agent.path, timeout=5.0)
    client.connect()
    caplog.set_level(logging.WARNING)
    client.drain_conn_events()
    assert not client.connected
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_a_refusal_at_hello_is_unavailable(agent_at):
    agent = agent_at(lambda kind, payload: proto.encode_frame(proto.ERROR, {"error": "not you"}))
    with pytest.raises(_agent_client_module().AgentUnavailable, match="not you"):
        AgentClient(agent.path).connect()


def _agent_client_module() -> Any:
    from otel_ebpf_flows import _agent_client

    return _agent_client


# -- mode agent in the instrumentor ----------------------------------------------------------------------


@pytest.fixture
def unprivileged(monkeypatch):
    def unsupported() -> None:
        raise AssertionError("mode agent must not reach the kernel checks")

    monkeypatch.setattr(_kernel, "check_environment", unsupported)
    monkeypatch.setattr(_instrumentor, "has_privilege", lambda: False)
    yield
    _instrumentor.EbpfFlowsInstrumentor().uninstrument()


def test_without_privilege_and_with_an_agent_spans_go_through_it_and_no_metric_is_registered(
        unprivileged, agent_at, caplog):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    agent = agent_at()
    reader = InMemoryMetricReader()
    caplog.set_level(logging.INFO)
    inst = _instrumentor.EbpfFlowsInstrumentor()
    inst.instrument(meter_provider=MeterProvider(metric_readers=[reader]), tracer_provider=TracerProvider(),
                    agent_socket=agent.path)
    state: Optional[Any] = _instrumentor.EbpfFlowsInstrumentor._agent
    assert state is not None and state.client.connected and inst.pipeline is None
    assert proto.HELLO in agent.requests
    data = reader.get_metrics_data()
    assert data is None or not [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]
    lines = [r.getMessage() for r in caplog.records if "mode agent" in r.getMessage()]
    assert len(lines) == 1 and agent.path in lines[0] and "registers no metrics" in lines[0]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    inst.uninstrument()
    assert _instrumentor.EbpfFlowsInstrumentor._agent is None and not state.client.connected


def test_without_an_agent_socket_the_privilege_warning_stays(unprivileged, tmp_path, caplog, monkeypatch):
    from otel_ebpf_flows.exceptions import UnsupportedEnvironment

    def no_privilege() -> None:
        raise UnsupportedEnvironment("loading eBPF programs needs root or CAP_BPF and CAP_PERFMON")

    monkeypatch.setattr(_kernel, "check_environment", no_privilege)
    caplog.set_level(logging.WARNING)
    _instrumentor.EbpfFlowsInstrumentor().instrument(agent_socket=str(tmp_path / "none.sock"))
    assert _instrumentor.EbpfFlowsInstrumentor._agent is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "CAP_BPF" in warnings[0]


def test_a_forked_child_asks_the_agent_for_its_own_process(unprivileged, agent_at):
    from opentelemetry.sdk.trace import TracerProvider

    agent = agent_at()
    _instrumentor.EbpfFlowsInstrumentor().instrument(tracer_provider=TracerProvider(), agent_socket=agent.path)
    assert agent.hello_pids == [os.getpid()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+: fork() with threads
        child = os.fork()
    if child == 0:  # pragma: no cover - the child reports by its exit status only
        status = 1
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                state = _instrumentor.EbpfFlowsInstrumentor._agent
                if state is not None and state.client.connected and state.client.pid == os.getpid():
                    status = 0
                    break
                time.sleep(0.01)
        finally:
            os._exit(status)
    _, status = os.waitpid(child, 0)
    assert os.WEXITSTATUS(status) == 0, "the child did not reconnect as itself"
    assert agent.hello_pids == [os.getpid(), child]
    parent_state = _instrumentor.EbpfFlowsInstrumentor._agent
    assert parent_state is not None and parent_state.client.pid == os.getpid()
    assert parent_state.client.thread_connections(1) == [(9, 100, 250)]  # the parent's connection still works


# -- discovery on the real /proc, with the probes replaced --------------------------------------------


class Recorded:
    started: List[int] = []
    stopped: List[int] = []


@pytest.fixture
def discovery(monkeypatch) -> Iterator[Callable[..., _agent.Agent]]:
    """Agents whose per-process start/stop only record (no kernel), over this host's real /proc."""
    Recorded.started, Recorded.stopped = [], []

    def start(self: _agent.Observed, config: Any, exporter_factory: Any, inherited: Any = None,
              span_lost: Any = None) -> None:
        Recorded.started.append(self.pid)

    def stop(self: _agent.Observed) -> None:
        Recorded.stopped.append(self.pid)

    monkeypatch.setattr(_agent.Observed, "start", start)
    monkeypatch.setattr(_agent.Observed, "stop", stop)
    made: List[_agent.Agent] = []

    def make(selector: Selector) -> _agent.Agent:
        agent = _agent.Agent(selector, Config(), socket_path=None, environ={})
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.shutdown()


def _child(env: Dict[str, str], script: str) -> Any:
    import subprocess

    return subprocess.Popen([sys.executable, "-c", script], env=env, stdin=subprocess.PIPE, text=True)


def _end(proc: Any) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()  # reaps it and closes its pipes


def _wait(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


WAIT_THEN_EXEC = ("import os, sys; sys.stdin.readline(); "
                  "os.execvpe('sleep', ['sleep', '60'], dict(os.environ, OTEL_SERVICE_NAME='late-declared'))")


def test_discovery_observes_declared_processes_and_retires_them(discovery):
    base = {"PATH": os.environ["PATH"]}
    declared = _child(dict(base, OTEL_SERVICE_NAME="svc-x", OTEL_RESOURCE_ATTRIBUTES="team=t"),
                      "import sys; sys.stdin.readline()")
    plain = _child(base, "import sys; sys.stdin.readline()")
    try:
        agent = discovery(Selector())
        agent.scan()
        assert declared.pid in agent.observed and plain.pid not in agent.observed
        assert agent.observed[declared.pid].attributes["service.name"] == "svc-x"
        assert agent.observed[declared.pid].attributes["team"] == "t"
        assert os.getpid() not in agent.observed
        agent.scan()
        assert Recorded.started.count(declared.pid) == 1  # once, not per scan
        declared.communicate("\n", timeout=30)
        agent.scan()
        assert declared.pid not in agent.observed
        _wait(lambda: declared.pid in Recorded.stopped, "the final export of the exited process")
    finally:
        for p in (declared, plain):
            _end(p)


def test_a_process_that_execs_into_a_declared_service_is_looked_at_again(discovery):
    """`env OTEL_SERVICE_NAME=x cmd`: the same pid and start time, a new environment and comm."""
    proc = _child({"PATH": os.environ["PATH"]}, WAIT_THEN_EXEC)
    try:
        agent = discovery(Selector())
        agent.scan()
        assert proc.pid not in agent.observed
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        _wait(lambda: _agent._read_text(f"/proc/{proc.pid}/comm").strip() == "sleep", "the exec")
        agent.scan()
        assert proc.pid in agent.observed
        assert agent.observed[proc.pid].attributes["service.name"] == "late-declared"
    finally:
        _end(proc)


def test_selectors_pick_undeclared_processes(discovery):
    proc = _child({"PATH": os.environ["PATH"]}, "import sys; sys.stdin.readline()")
    try:
        agent = discovery(Selector(declared=False, pids=(proc.pid,)))
        agent.scan()
        assert list(agent.observed) == [proc.pid]
        comm = _agent._read_text(f"/proc/{proc.pid}/comm").strip()
        assert agent.observed[proc.pid].attributes["service.name"] == f"unknown_service:{comm}"
    finally:
        _end(proc)


# -- export configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(("environ", "module"), [
    ({}, "opentelemetry.exporter.otlp.proto.http.metric_exporter"),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "opentelemetry.exporter.otlp.proto.grpc.metric_exporter"),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf"},
     "opentelemetry.exporter.otlp.proto.http.metric_exporter"),
])
def test_the_exporter_follows_the_standard_protocol_variables(environ, module):
    exporter = _agent.make_exporter(environ)
    try:
        assert type(exporter).__module__ == module and type(exporter).__name__ == "OTLPMetricExporter"
    finally:
        exporter.shutdown()


def test_an_unsupported_protocol_stops_the_agent_with_one_line(monkeypatch, caplog):
    monkeypatch.setattr(_agent, "check_environment", lambda: None)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    caplog.set_level(logging.ERROR)
    assert _agent.run_agent(Selector(), 5.0, None, None) == 1
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "http/json" in record.getMessage() and "grpc or http/protobuf" in record.getMessage()


# -- span self-telemetry -----------------------------------------------------------------------------


def test_span_records_the_agent_could_not_hand_over_are_counted_as_in_process():
    from otel_ebpf_flows._source import ProbeStats, Snapshot

    from .fakes import FakeSource

    key = FlowKey(Role.CLIENT, "10.0.0.1", 443, "ipv4")
    kernel = FakeSource(Snapshot(counters={}, probes=ProbeStats(events_lost={"tcp_flows.conn_events": 2,
                                                                              "tcp_flows.events": 1},
                                                                 map_evictions={"tcp_flows.socks": 4})))
    lost = [5]
    source = _agent.ObservedSource(kernel, lambda: lost[0])
    snapshot = source.sample()
    assert snapshot.probes.events_lost == {"tcp_flows.conn_events": 7, "tcp_flows.events": 1}
    assert snapshot.probes.map_evictions == {"tcp_flows.socks": 4}
    assert key not in snapshot.counters


def test_a_full_client_queue_drops_the_oldest_and_counts_them(tmp_path, monkeypatch):
    monkeypatch.setattr(_agent, "CLIENT_QUEUE", 8)
    server = _agent.SpanServer(str(tmp_path / "a.sock"), None, Config())  # not started: no socket, no kernel
    feed = _agent.SpanFeed(4242, 7, Config())
    feed.add_client(1)
    feed.add_client(2)
    server._feeds[(4242, 7)] = feed
    events = [FlowEvent(kind="retransmit", key=EVENT.key, ts_ns=i, duration_s=0.0, srtt_s=None, conn_id=9, count=1)
              for i in range(11)]
    for e in events:
        feed.on_event(e)
    feed.on_event(FlowEvent(kind="rtt", key=EVENT.key, ts_ns=99, duration_s=0.0, srtt_s=0.001))  # a metric record
    got, lost = feed.take(1)
    assert got == events[3:] and lost == 3
    assert feed.take(1) == ([], 0)
    assert server.span_lost(4242, 7) == 6  # 3 for each client; the kernel lost none
    server._release(feed, 1)
    server._release(feed, 2)  # the last client: the feed closes, its count stays
    assert (4242, 7) not in server._feeds and server.span_lost(4242, 7) == 6
    server.forget(4242)
    assert server.span_lost(4242, 7) == 0


def test_a_process_that_loads_its_own_probes_after_discovery_is_no_longer_observed(discovery, monkeypatch):
    proc = _child({"PATH": os.environ["PATH"], "OTEL_SERVICE_NAME": "self-instrumented"},
                  "import sys; sys.stdin.readline()")
    try:
        agent = discovery(Selector())
        agent.scan()
        assert proc.pid in agent.observed
        real = _agent.loads_own_probes
        monkeypatch.setattr(_agent, "loads_own_probes", lambda pid: pid == proc.pid or real(pid))
        agent.scan()
        assert proc.pid not in agent.observed
        _wait(lambda: proc.pid in Recorded.stopped, "the retirement")
        agent.scan()
        assert proc.pid not in agent.observed and Recorded.started.count(proc.pid) == 1
    finally:
        _end(proc)


def test_an_agent_pipeline_over_the_kernel_source_reads_its_counters_at_collection():
    from otel_ebpf_flows._source import ProbeStats, Snapshot
    from otel_ebpf_flows._telemetry import ReadsNow

    from .fakes import FakeSource

    class Reads(FakeSource):
        def __init__(self, snapshot: Snapshot) -> None:
            super().__init__(snapshot)
            self.scans = 0

        def scan(self) -> None:
            self.scans += 1

        def read(self) -> Snapshot:
            return Snapshot(counters={}, probes=ProbeStats(events_lost={"tcp_flows.events": 1}, map_evictions={}))

    plain = _agent.observed(FakeSource(Snapshot(counters={}, probes=ProbeStats({}, {}))), lambda: 2)
    assert not isinstance(plain, ReadsNow)
    kernel = Reads(Snapshot(counters={}, probes=ProbeStats({}, {})))
    source = _agent.observed(kernel, lambda: 2)
    assert isinstance(source, ReadsNow)
    source.scan()
    assert kernel.scans == 1
    assert source.read().probes.events_lost == {"tcp_flows.events": 1, "tcp_flows.conn_events": 2}
