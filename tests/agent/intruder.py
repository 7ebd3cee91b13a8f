"""A third unprivileged process that asks the agent for another process's data (tests/agent).

python -m tests.agent.intruder SOCKET VICTIM_PID TID...
python -m tests.agent.intruder SOCKET hello

Speaks the protocol by hand: HELLO, then DRAIN and THREADS requests that name the
victim's pid and each of its thread ids (it declares a service of its own, so the agent
serves it: its own data). Prints one JSON line with every raw reply
(hex) and what it decodes to; then sends garbage on a second connection and
reports the agent's answer.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any, Dict, List

from otel_ebpf_flows import _agent_protocol as proto


def ask(sock: socket.socket, kind: int, payload: Dict[str, Any]) -> Dict[str, Any]:
    sock.sendall(proto.encode_frame(kind, payload))
    header = proto._recv_exactly(sock, proto.HEADER.size)
    _kind, length = proto.decode_header(header)
    body = proto._recv_exactly(sock, length)
    got, answer = proto.decode_frame(header + body)
    return {"raw": (header + body).hex(), "kind": got, "payload": answer}


def main() -> None:
    if sys.argv[2] == "hello":  # only say HELLO and report the answer
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(sys.argv[1])
        print(json.dumps(ask(sock, proto.HELLO, {})), flush=True)
        return
    path, victim = sys.argv[1], int(sys.argv[2])
    tids = [int(t) for t in sys.argv[3:]]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    out: Dict[str, Any] = {"hello": ask(sock, proto.HELLO, {"pid": victim})}
    drains: List[Dict[str, Any]] = [ask(sock, proto.DRAIN, {"pid": victim}) for _ in range(3)]
    out["drains"] = drains
    out["threads"] = {str(t): ask(sock, proto.THREADS, {"tid": t, "pid": victim}) for t in tids}
    sock.close()

    garbage = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    garbage.settimeout(30)
    garbage.connect(path)
    garbage.sendall(b"\x07\x01\xff\xff\xff\xffnot a frame")
    reply = b""
    while True:
        chunk = garbage.recv(65536)
        if not chunk:
            break
        reply += chunk
    garbage.close()
    out["garbage_reply"] = reply.hex()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
