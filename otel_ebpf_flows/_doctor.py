"""``otel-ebpf-flows doctor``: will kernel TCP telemetry work on this host, and if not, why.

:func:`run_checks` goes through what the library needs, in the order it needs
it (Linux, a kernel with BTF, privilege, the system libbpf, the shipped object),
then really loads and attaches the probes the way ``instrument()`` does and
detaches them again; last, it names the mode ``instrument()`` would run in
(ebpf, agent, sock_diag or off) and, for sock_diag, what that mode cannot see.
Each step is a :class:`Check`: passed (``ok=True``),
failed (``ok=False``, with a concrete ``fix``) or a warning (``ok=None``: worth
knowing, not in the way). No check raises: an unexpected error is a failed
check that carries the error.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import sys
from typing import Callable, List, Optional, Sequence, TextIO, Tuple

import attrs

from . import _kernel, _libbpf
from ._config import ENV_MODE, Config, load_config
from ._sockdiag import CANNOT_SEE, SockDiagSource
from .exceptions import ConfigurationError

MIN_KERNEL = (5, 9)
TRACEFS = "/sys/kernel/tracing"
LOCKDOWN = "/sys/kernel/security/lockdown"


@attrs.frozen
class Check:
    """One line of the doctor's report."""

    name: str
    #: True: passed; False: failed (the library will not work); None: a warning.
    ok: Optional[bool]
    detail: str
    #: What to do about a failure or warning; empty when there is nothing to do.
    fix: str = ""


def will_work(checks: List[Check]) -> bool:
    """Whether the library will work, given a report: no check failed."""
    return all(c.ok is not False for c in checks)


_MARKS = {True: "OK", False: "FAIL", None: "WARN"}
_COLORS = {True: "\033[32m", False: "\033[31m", None: "\033[33m"}


def use_color(stream: TextIO) -> bool:
    """Whether to color marks on ``stream`` (a terminal, and NO_COLOR unset)."""
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def format_checks(checks: Sequence[Check], color: bool = False, only_failures: bool = False) -> List[str]:
    """Report lines: one per check with an OK/FAIL/WARN mark, then the fix of each problem."""
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for check in checks:
        if only_failures and check.ok is not False:
            continue
        mark = f"[{_MARKS[check.ok]:^4}]"
        if color:
            mark = f"{_COLORS[check.ok]}{mark}\033[0m"
        first, *rest = check.detail.splitlines() or [""]
        lines.append(f"{mark} {check.name:<{width}}  {first}".rstrip())
        lines += [f"       {'':<{width}}  {line}" for line in rest]
        if check.fix and check.ok is not True:
            lines.append(f"       {'':<{width}}  fix: {check.fix}")
    return lines


def interpreter_path() -> str:
    """The real interpreter file, the one ``setcap`` has to be given."""
    return os.path.realpath(sys.executable or "python3")


def _guard(name: str, fn: Callable[[], Check]) -> Check:
    try:
        return fn()
    except Exception as exc:  # doctor reports, it never tracebacks
        return Check(name, False, f"unexpected error: {type(exc).__name__}: {exc}",
                     "report this at the project's issue tracker with the output of this command")


def _platform() -> Check:
    if sys.platform.startswith("linux"):
        return Check("platform", True, f"Linux {platform.machine()}")
    return Check("platform", False, f"{sys.platform}: eBPF needs Linux",
                 "run on Linux 5.9 or newer; elsewhere instrument() is a logged no-op")


def kernel_version(release: str) -> Optional[Tuple[int, int]]:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _kernel_release() -> Check:
    release = platform.release()
    version = kernel_version(release)
    need = f"{MIN_KERNEL[0]}.{MIN_KERNEL[1]}"
    if version is None:
        return Check("kernel", None, f"{release}: cannot tell the version",
                     f"the probes need {need} or newer; the load check below is what counts")
    if version < MIN_KERNEL:
        return Check("kernel", None, f"{release}: older than {need}",
                     f"upgrade to {need} or newer for the full set of probes; the load check "
                     "below says what this kernel takes")
    return Check("kernel", True, f"{release} ({need} or newer needed)")


def _btf() -> Check:
    path = _kernel.VMLINUX_BTF
    if os.path.exists(path):
        return Check("BTF", True, f"{path} ({os.path.getsize(path) // 1024} KiB): CO-RE can relocate")
    return Check("BTF", False, f"{path} is missing: the kernel exposes no type information",
                 "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (the default of most "
                 "distributions since 2020)")


def _capability_names(caps: int) -> str:
    names = [name for bit, name in ((_kernel.CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
                                    (_kernel.CAP_BPF, "CAP_BPF"),
                                    (_kernel.CAP_PERFMON, "CAP_PERFMON")) if caps & (1 << bit)]
    return ", ".join(names) or "none of CAP_SYS_ADMIN, CAP_BPF, CAP_PERFMON"


def _privileges() -> Check:
    caps = _kernel.effective_capabilities()
    who = f"uid {os.geteuid()}, effective capabilities: {_capability_names(caps)}"
    if _kernel.has_privilege():
        return Check("privileges", True, who)
    return Check(
        "privileges", False, f"{who}: loading eBPF programs needs root or CAP_BPF + CAP_PERFMON",
        f"run as root, or `setcap cap_bpf,cap_perfmon+ep {interpreter_path()}` (every script this "
        "interpreter runs gets them), or in Kubernetes securityContext.capabilities.add: "
        "[\"BPF\", \"PERFMON\"]",
    )


def _agent_check(config: Config) -> Check:
    """Without privilege: whether mode agent (the node agent's socket) is there instead."""
    from ._agent_client import AgentClient, AgentUnavailable

    path = config.agent_socket
    if not os.path.exists(path):
        return Check("agent", None, f"mode agent: no node agent socket at {path}",
                     "run `otel-ebpf-flows agent` as root on this host (docs/agent.md): it exports this "
                     "process's metrics and enriches its spans without privilege here")
    client = AgentClient(path)
    try:
        client.connect()
    except AgentUnavailable as exc:
        return Check("agent", None, f"mode agent: {exc}",
                     "check that the agent runs, that this user may connect (its --socket-group), and that "
                     "this process declares its service (OTEL_SERVICE_NAME) or the agent selects it")
    finally:
        client.close()
    return Check("agent", True, f"mode agent: the agent at {path} answers: it exports this process's metrics "
                 "(when it observes it) and spans are enriched through it; no probes load here")


def _loaded_libbpf_path() -> str:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.split(None, 5)[-1].strip()
                if re.search(r"/libbpf\.so[.\d]*$", path):
                    return path
    except OSError:
        pass
    return ""


def _libbpf_check() -> Check:
    try:
        _libbpf.load_library()
        version = _libbpf.libbpf_version()
    except Exception as exc:
        return Check("libbpf", False, str(exc),
                     "install the system libbpf 1.0 or newer (Debian/Ubuntu: apt-get install "
                     "libbpf1; Fedora/RHEL: dnf install libbpf; Alpine: apk add libbpf)")
    path = _loaded_libbpf_path()
    return Check("libbpf", True, f"{version}" + (f" ({path})" if path else "") + ", 1.0 or newer needed")


def _shipped_object() -> Check:
    try:
        path = _kernel.verify_object()
    except Exception as exc:
        return Check("BPF object", False, str(exc),
                     "reinstall: pip install --force-reinstall otel-ebpf-flows (from a source "
                     "checkout: make -C bpf)")
    return Check("BPF object", True, f"{path}: SHA-256 matches SHA256SUMS")


def _mounted(fstype: str, where: str) -> bool:
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            return any(len(p) > 2 and p[1] == where and p[2] == fstype
                       for p in (line.split() for line in f))
    except OSError:
        return False


def _tracefs() -> Check:
    if _mounted("tracefs", TRACEFS) or _mounted("tracefs", "/sys/kernel/debug/tracing"):
        return Check("tracefs", True, "mounted (informational: the tp_btf and raw_tp probes do not use it)")
    return Check("tracefs", None,
                 f"not mounted at {TRACEFS} (informational: the tp_btf and raw_tp probes do not "
                 "need it; tools such as bpftool and libbpf-tools may)",
                 f"only if another tool wants it: mount -t tracefs tracefs {TRACEFS}")


def _lockdown() -> Check:
    try:
        with open(LOCKDOWN, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return Check("lockdown", True, f"not in force (no {LOCKDOWN})")
    m = re.search(r"\[(\w+)\]", text)
    mode = m.group(1) if m else text.strip()
    if mode == "confidentiality":
        return Check("lockdown", False,
                     "kernel lockdown is in confidentiality mode: BPF programs may not read kernel memory",
                     "boot with lockdown=integrity or none (with Secure Boot, see your distribution's "
                     "documentation)")
    return Check("lockdown", True, mode)


def _configuration() -> Tuple[Check, Optional[Config]]:
    try:
        config = load_config({})
    except ConfigurationError as exc:
        return Check("configuration", False, str(exc),
                     "correct or unset the variable; `otel-ebpf-flows doctor` reads the same "
                     "OTEL_PYTHON_EBPF_FLOWS_* variables as instrument()"), None
    changed = [f"{a.name}={getattr(config, a.name)!r}" for a in attrs.fields(Config)
               if getattr(config, a.name) != a.default]
    return Check("configuration", True,
                 ("from the environment: " + ", ".join(changed)) if changed else "defaults"), config


class _Capture(logging.Handler):
    """Keeps what the kernel source and libbpf log while the probes load."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(record.getMessage())
        except Exception:  # pragma: no cover
            pass


def _load_and_attach(config: Config, verbose: bool) -> List[Check]:
    """Load and attach the probes exactly as ``instrument()`` does, sample once, detach.

    Unless ``verbose``, log records are captured for the report rather than shown.
    """
    log = logging.getLogger("otel_ebpf_flows")
    libbpf_log = logging.getLogger("otel_ebpf_flows.libbpf")
    capture = _Capture()
    saved = (log.level, log.propagate, libbpf_log.level)
    log.addHandler(capture)
    if not verbose:
        log.setLevel(logging.DEBUG)
        log.propagate = False
        libbpf_log.setLevel(logging.WARNING)  # libbpf's debug output is thousands of lines
    source = _kernel.KernelSource(config)
    checks: List[Check] = []
    try:
        try:
            source.start(lambda _event: None)
        except Exception as exc:
            tail = [line for line in capture.lines if line.strip()][-8:]
            detail = f"{type(exc).__name__}: {exc}"
            if tail:
                detail += "\n" + "\n".join(f"  | {line}" for line in tail)
            return [Check("load", False, detail,
                          "run `otel-ebpf-flows doctor --verbose` for libbpf's full log (the "
                          "verifier's output) and report it with this output")]
        refused = [line for line in capture.lines if line.startswith("loading the tp_btf")]
        if source.variant == "tp_btf":
            checks.append(Check("load", True, "tp_btf programs (BTF-typed tracepoints) loaded and verified"))
        else:
            checks.append(Check(
                "load", None,
                f"{source.variant} programs loaded; the kernel refused tp_btf"
                + (f" ({refused[0].split(': ', 1)[-1]})" if refused else ""),
                "nothing is lost but a little speed; a kernel with BTF-typed tracepoints (5.5+) "
                "uses tp_btf",
            ))
        for name in source.attached:
            checks.append(Check(f"attach {name}", True, "attached"))
        if source.can_claim:
            checks.append(Check("shared listeners", True,
                                "sock_recv_length/sock_send_length programs loaded: after fork, each "
                                "process counts the connections it accepts on a shared listener"))
        else:
            checks.append(Check(
                "shared listeners", None,
                "this kernel lacks sock:sock_recv_length/sock_send_length (Linux 6.3+): after fork, "
                "connections accepted on a shared listener are counted by the process that opened it",
                "a 6.3+ kernel for per-worker counts in pre-fork servers (gunicorn, uWSGI), or open "
                "the listeners in each worker"))
        source.sample()
        checks.append(Check("iterator", True,
                            f"{_kernel.ITERATOR} (iter/tcp) ran and the counter maps were read"))
        return checks
    except Exception as exc:
        checks.append(Check("probes", False, f"{type(exc).__name__}: {exc}",
                            "run `otel-ebpf-flows doctor --verbose` and report its output"))
        return checks
    finally:
        try:
            source.close()
        finally:
            log.removeHandler(capture)
            log.setLevel(saved[0])
            log.propagate = saved[1]
            libbpf_log.setLevel(saved[2])


FULL_MODE_FIX = ("for full (ebpf) mode, fix the failures above (privileges: grant CAP_BPF and CAP_PERFMON), "
                 "or run the otel-ebpf-flows node agent on this host")


def _sock_diag_works() -> Optional[str]:
    """None if a sock_diag dump of this network namespace works here, else why not."""
    source = SockDiagSource(inodes=lambda: ())
    try:
        source.start(lambda _event: None)
    except Exception as exc:
        return str(exc)
    finally:
        source.close()
    return None


def _mode(config: Config, ebpf_ok: bool, agent_ok: bool) -> Check:
    """The mode ``instrument()`` would run in, with this configuration, in this process."""
    if config.mode == "off":
        return Check("mode", None, f"off: {ENV_MODE}=off, instrument() does nothing",
                     f"unset {ENV_MODE} (or set it to auto) to turn the instrumentation on")
    if config.mode in ("auto", "ebpf") and ebpf_ok:
        return Check("mode", True, "ebpf: instrument() loads the probes (every metric, span enrichment)")
    if config.mode == "ebpf":
        return Check("mode", False, "off: mode is ebpf and the probes cannot be used here, so instrument() does "
                     "nothing", f"fix the failures above, or set {ENV_MODE}=auto to fall back to the node agent "
                     "or to sock_diag")
    if config.mode in ("auto", "agent"):
        if agent_ok:
            return Check("mode", True, "agent: instrument() reads this process's flows from the node agent")
        if config.mode == "agent":
            return Check("mode", False, "off: mode is agent and no otel-ebpf-flows node agent is reachable",
                         f"start the otel-ebpf-flows node agent on this host, or set {ENV_MODE}=auto")
    failure = _sock_diag_works()
    if failure is not None:
        return Check("mode", False, f"off: the probes cannot be used and the sock_diag fallback fails: {failure}",
                     "fix the failures above; sock_diag needs a NETLINK_SOCK_DIAG socket, which a seccomp "
                     "profile may block")
    chosen = f"chosen by {ENV_MODE}=sock_diag" if config.mode == "sock_diag" else "the fallback"
    detail = (f"sock_diag ({chosen}): instrument() reads this process's own sockets from sock_diag/TCP_INFO "
              f"every {config.sock_diag_interval:g} s; every point carries ebpf_flows.source=sock_diag\n"
              f"it cannot see: {CANNOT_SEE}")
    if config.mode == "sock_diag" and ebpf_ok:
        return Check("mode", None, detail, f"unset {ENV_MODE} for full (ebpf) mode: the probes work here")
    return Check("mode", None, detail, FULL_MODE_FIX)


def run_checks(load: bool = True, verbose: bool = False) -> List[Check]:
    """Every check, in order; with ``load``, the probes are really loaded and attached.

    With ``verbose``, what the loader and libbpf log goes to the configured logging.
    """
    checks = [
        _guard("platform", _platform),
    ]
    if checks[0].ok is False:
        return checks
    checks += [
        _guard("kernel", _kernel_release),
        _guard("BTF", _btf),
        _guard("privileges", _privileges),
        _guard("libbpf", _libbpf_check),
        _guard("BPF object", _shipped_object),
    ]
    checks.append(_guard("lockdown", _lockdown))
    checks.append(_guard("tracefs", _tracefs))
    config: Optional[Config] = None
    try:
        check, config = _configuration()
    except Exception as exc:  # doctor reports, it never tracebacks
        check = Check("configuration", False, f"unexpected error: {type(exc).__name__}: {exc}",
                      "report this at the project's issue tracker with the output of this command")
    checks.append(check)
    if config is not None and not _kernel.has_privilege():
        checks.append(_guard("agent", lambda: _agent_check(config)))
    if load:
        if not will_work(checks) or config is None:
            checks.append(Check("load", None, "not attempted: a requirement above is missing",
                                "fix the failures above, then run doctor again"))
        else:
            try:
                checks += _load_and_attach(config, verbose)
            except Exception as exc:  # pragma: no cover - _load_and_attach catches its own
                checks.append(Check("load", False, f"unexpected error: {exc}", ""))
    if config is not None:
        ebpf_ok = will_work(checks)
        agent_ok = any(c.name == "agent" and c.ok for c in checks)
        checks.append(_guard("mode", lambda: _mode(config, ebpf_ok, agent_ok)))
    return checks
