"""The ``otel-ebpf-flows`` command (also ``python -m otel_ebpf_flows``).

``doctor``
    what this host supports and whether the library will work here; exit status
    0 if it will, 1 if not.
``demo``
    runs a small instrumented client and server in this process and prints the
    metrics they produced; no collector needed.
``watch``
    a live view of this host's TCP flows, per peer (see :mod:`otel_ebpf_flows._watch`);
    snapshots as text or JSON lines when the output is not a terminal. Exit status
    0 on a clean exit (q, Ctrl-C, SIGTERM), 1 if the probes cannot load.
``agent``
    the node agent (see :mod:`otel_ebpf_flows._agent` and docs/agent.md): exports the
    metrics of this host's services over OTLP under each one's Resource, and serves
    span enrichment to unprivileged services over a Unix socket. Runs until SIGTERM;
    exit status 0 on a clean stop, 1 if it cannot start.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from ._doctor import format_checks, interpreter_path, run_checks, use_color
from .version import __version__

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_UNAVAILABLE = 2


def _doctor(args: argparse.Namespace) -> int:
    print(f"otel-ebpf-flows {__version__} doctor (python {sys.version.split()[0]}, {interpreter_path()})")
    checks = run_checks(load=not args.no_load, verbose=args.verbose)
    for line in format_checks(checks, color=use_color(sys.stdout)):
        print(line)
    failed = sum(1 for c in checks if c.ok is False)
    mode = next((c.detail.split(" ", 1)[0].rstrip(":") for c in checks if c.name == "mode"), "off")
    if mode == "agent" and all(c.name == "privileges" for c in checks if c.ok is False):
        print("\nKernel TCP telemetry will work here in mode agent: the node agent exports this process's "
              "metrics and spans are enriched through it (no probes load in this process).")
        return EXIT_OK
    if failed:
        if mode in ("sock_diag", "agent"):
            print(f"\nFull kernel TCP telemetry will NOT work here: {failed} check(s) failed; "
                  f"instrument() would run in {mode} mode (see the mode line above).")
        else:
            print(f"\nKernel TCP telemetry will NOT work here: {failed} check(s) failed "
                  "(instrument() would log a warning and do nothing).")
        return EXIT_FAIL
    if mode == "off":
        print("\nKernel TCP telemetry is turned off here (see the mode line above).")
        return EXIT_FAIL
    if mode != "ebpf":
        print(f"\ninstrument() would run in {mode} mode here (see the mode line above).")
        return EXIT_OK
    if args.no_load:
        print("\nThe requirements are met (the probes were not loaded: --no-load).")
    else:
        variant = next((c.detail.split()[0] for c in checks if c.name == "load"), "?")
        print(f"\nKernel TCP telemetry will work here ({variant} programs).")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(duration=args.duration, as_json=args.json)


def _watch(args: argparse.Namespace) -> int:
    from ._watch import Filter, View, run_watch

    view = View(sort=args.sort, reverse=args.reverse, limit=args.limit,
                keep=Filter(ports=tuple(args.port), networks=tuple(args.peer), role=args.role))
    return run_watch(interval=args.interval, view=view, count=args.count, batch=args.batch, as_json=args.json)


def _agent(args: argparse.Namespace) -> int:
    from ._agent import Selector, run_agent

    logging.getLogger("otel_ebpf_flows").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    selector = Selector(declared=not args.no_declared, pids=tuple(args.pid), cgroups=tuple(args.cgroup),
                        names=tuple(args.name))
    return run_agent(selector, args.scan_interval, None if args.no_span_service else args.socket, args.socket_group)


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.2 <= value <= 3600:
        raise argparse.ArgumentTypeError("expected from 0.2 to 3600 seconds")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("expected 1 or more")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError("expected a port from 1 to 65535")
    return value


def _peer(text: str) -> object:
    from ._watch import parse_network

    try:
        return parse_network(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address or CIDR block") from None


def _scan_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError("expected from 0.1 to 3600 seconds")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.5 <= value <= 3600:
        raise argparse.ArgumentTypeError("expected from 0.5 to 3600 seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otel-ebpf-flows",
        description="The Linux kernel's view of a service's TCP connections, as OpenTelemetry metrics.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    doctor = sub.add_parser("doctor", help="check that the probes work here, and how to fix it if not",
                            description="Check what this host supports, load and attach the probes, and "
                            "say how to fix whatever fails. Exit status 0 if the library will work.")
    doctor.add_argument("--no-load", action="store_true", help="check the requirements only; load nothing")
    doctor.add_argument("-v", "--verbose", action="store_true", help="show the loader's and libbpf's log")
    doctor.set_defaults(func=_doctor)

    demo = sub.add_parser("demo", help="run an instrumented client/server and print its metrics",
                          description="Run a small TCP client and server in this process with the "
                          "instrumentation on, then print every metric point (no collector needed).")
    demo.add_argument("--duration", type=_positive_seconds, default=3.0, metavar="SECONDS",
                      help="how long to generate traffic (default: 3)")
    demo.add_argument("--json", action="store_true", help="print the raw metric points as JSON")
    demo.set_defaults(func=_demo)

    from ._watch import SORT_NAMES, SORTS

    watch = sub.add_parser(
        "watch", help="live view of this host's TCP flows per peer (retransmits, RTT, handshakes, resets)",
        description="A live view of every process's TCP connections on this host, one row per peer: "
        "connections, failed attempts, retransmits, RTT, handshake latency, RSTs, bytes and zero windows, "
        "counted by the library's own probes since the command started. Keys: q quit, s/S change the "
        "sort, r reverse it, p pause. When the output is not a terminal (or with --batch / --json) it "
        "prints a snapshot every interval instead. Needs the same privileges as the library "
        "(`otel-ebpf-flows doctor` says what is missing).",
        epilog="sort keys: " + "; ".join(f"{name}: {what}" for name, (what, _) in SORTS.items()),
    )
    watch.add_argument("-i", "--interval", type=_interval, default=2.0, metavar="SECONDS",
                       help="seconds between refreshes (default: 2)")
    watch.add_argument("--sort", choices=SORT_NAMES, default="retrans", help="row order (default: retrans)")
    watch.add_argument("-r", "--reverse", action="store_true", help="reverse the order")
    watch.add_argument("--port", type=_port, action="append", default=[], metavar="PORT",
                       help="only this port: the service port of client rows, our listening port of "
                       "server rows (repeatable)")
    watch.add_argument("--peer", type=_peer, action="append", default=[], metavar="ADDRESS[/BITS]",
                       help="only peers in this address or CIDR block (repeatable)")
    watch.add_argument("--role", choices=("client", "server"), help="only connections this host opened "
                       "(client) or accepted (server)")
    watch.add_argument("-n", "--count", type=_positive_int, metavar="N",
                       help="exit after N refreshes (default: run until q, Ctrl-C or SIGTERM)")
    watch.add_argument("--limit", type=_positive_int, metavar="ROWS", help="show at most ROWS peers")
    watch.add_argument("-b", "--batch", action="store_true",
                       help="print text snapshots even on a terminal (the default when output is not one)")
    watch.add_argument("--json", action="store_true", help="print each snapshot as one JSON line")
    watch.set_defaults(func=_watch)

    from ._config import DEFAULT_AGENT_SOCKET

    agent = sub.add_parser(
        "agent", help="node agent: metrics of this host's services over OTLP, span data for unprivileged ones",
        description="Observe this host's processes that declare a service (OTEL_SERVICE_NAME or service.name in "
        "OTEL_RESOURCE_ATTRIBUTES), or that a selector names, and export each one's kernel TCP metrics over "
        "OTLP (standard OTEL_EXPORTER_OTLP_* variables) under its own Resource. Unprivileged instrumented "
        "services get span enrichment over a Unix socket, each its own process's data only. Needs root, or "
        "CAP_BPF + CAP_PERFMON + CAP_SYS_PTRACE. See docs/agent.md.",
    )
    agent.add_argument("--scan-interval", type=_scan_interval, default=5.0, metavar="SECONDS",
                       help="seconds between scans of /proc for processes that start and exit (default: 5)")
    agent.add_argument("--pid", type=_positive_int, action="append", default=[], metavar="PID",
                       help="also observe this process (repeatable)")
    agent.add_argument("--cgroup", action="append", default=[], metavar="PATH",
                       help="also observe processes in this cgroup or below it, e.g. /system.slice/app.service "
                       "(repeatable)")
    agent.add_argument("--name", action="append", default=[], metavar="NAME",
                       help="also observe processes with this comm or executable name (repeatable)")
    agent.add_argument("--no-declared", action="store_true",
                       help="observe only what --pid/--cgroup/--name select, not every process that declares a "
                       "service in its environment")
    agent.add_argument("--socket", default=DEFAULT_AGENT_SOCKET, metavar="PATH",
                       help=f"the span service's Unix socket (default: {DEFAULT_AGENT_SOCKET})")
    agent.add_argument("--socket-group", metavar="GROUP",
                       help="group allowed to connect to the socket (mode 0660); default: root only")
    agent.add_argument("--no-span-service", action="store_true", help="export metrics only; no socket")
    agent.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    agent.set_defaults(func=_agent)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_UNAVAILABLE
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
        format=("%(asctime)s " if args.func is _agent else "") + "%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `otel-ebpf-flows doctor | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
