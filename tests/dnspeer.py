"""A scripted DNS server (UDP and TCP on one address) and a private network +
mount namespace whose /etc/resolv.conf names it, for probing the balancer
against a hostile or broken DNS without touching the machine.

`DnsNamespace` starts `unshare -m -n` (root only): a holder process whose
namespaces the balancer enters (`prefix`, for `tests.support.Balancer`) and
whose network namespace the test's own thread joins (`inside`), so backends,
this server and the test's clients all live on that namespace's loopback.

`ScriptedDns` answers A/AAAA queries by script: a name maps to a callable
taking the query type (1 A, 28 AAAA) and returning what to do (`answer`,
`NXDOMAIN`, `SERVFAIL`, `SILENT`, or raw bytes to send as they are), or
`Late` (any of them, carried out some time after the query: a slow DNS,
the server answering other queries meanwhile). It parses only the header
and the question: enough to echo the id and question.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loadtest.reaper import guarded_popen, release

A, AAAA = 1, 28
CLONE_NEWNET = 0x40000000
NOERROR, SERVFAIL_CODE, NXDOMAIN_CODE = 0, 2, 3
SILENT = "silent"  # never answer
NXDOMAIN = "nxdomain"
SERVFAIL = "servfail"
# routed to the namespace's loopback, where nothing takes them: a connect to
# one of its addresses is never answered (as to a host that went away)
SILENT_NET = "10.9.0.0/16"
UDP_LIMIT = 512  # larger answers go truncated over UDP (TC), whole over TCP

Action = Any  # list of addresses, SILENT, NXDOMAIN, SERVFAIL, or raw bytes
Script = Callable[[int], Action]


def answer(*addresses: str) -> Script:
    """A script answering `addresses` (each to the query of its family)."""
    return lambda qtype: list(addresses)


@dataclass(frozen=True)
class Late:
    """`action`, `seconds` after the query."""

    seconds: float
    action: Action


def late(seconds: float, script: Script) -> Script:
    """`script`'s actions, each `seconds` after its query."""
    return lambda qtype: Late(seconds, script(qtype))


def parse_question(query: bytes) -> tuple[int, int, str, int, bytes]:
    """(id, flags, name, qtype, question bytes) of a query (raises ValueError)."""
    if len(query) < 12:
        raise ValueError("short header")
    ident, flags = struct.unpack("!HH", query[:4])
    at, labels = 12, []
    while True:
        length = query[at]
        at += 1
        if length == 0:
            break
        labels.append(query[at:at + length].decode("ascii", "replace"))
        at += length
    qtype = struct.unpack("!H", query[at:at + 2])[0]
    return ident, flags, ".".join(labels).lower(), qtype, query[12:at + 4]


def response(query: bytes, action: Action) -> bytes | None:
    """The reply to `query` under `action`; None: no reply."""
    if isinstance(action, bytes):
        return action
    if action == SILENT:
        return None
    ident, flags, _, qtype, question = parse_question(query)
    if isinstance(action, list):
        rcode, records = NOERROR, [rr(qtype, a) for a in action if family_type(a) == qtype]
    else:
        rcode, records = {NXDOMAIN: NXDOMAIN_CODE, SERVFAIL: SERVFAIL_CODE}[action], []
    head = struct.pack("!HHHHHH", ident, 0x8180 | (flags & 0x0100) | rcode, 1,
                       len(records), 0, 0)
    return head + question + b"".join(records)


def family_type(address: str) -> int:
    return AAAA if ":" in address else A


def rr(qtype: int, address: str) -> bytes:
    """An answer record for the question's name (a pointer to offset 12)."""
    data = socket.inet_pton(socket.AF_INET6 if qtype == AAAA else socket.AF_INET, address)
    return struct.pack("!HHHIH", 0xC00C, qtype, 1, 30, len(data)) + data


class ScriptedDns:
    """A DNS server on 127.0.0.1:53 of the current network namespace (UDP and TCP)."""

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.scripts: dict[str, Script] = {}
        self.queries: dict[str, int] = {}  # name -> queries seen (both types, both transports)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((address, 53))
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((address, 53))
        self.tcp.listen(64)
        self.stopped = False
        for loop in (self.udp_loop, self.tcp_loop):
            threading.Thread(target=loop, daemon=True).start()

    def script(self, name: str, script: Script) -> None:
        self.scripts[name.lower()] = script

    def reply(self, query: bytes, udp: bool) -> tuple[bytes | None, float]:
        """The reply to `query` (None: none) and the seconds to wait before it."""
        try:
            _, _, name, qtype, _ = parse_question(query)
        except (ValueError, IndexError, struct.error):
            return None, 0.0
        self.queries[name] = self.queries.get(name, 0) + 1
        script = self.scripts.get(name)
        action = script(qtype) if script is not None else NXDOMAIN
        delay = 0.0
        if isinstance(action, Late):
            delay, action = action.seconds, action.action
        data = response(query, action)
        if data is not None and udp and len(data) > UDP_LIMIT and data[2] & 0x80:
            data = data[:2] + bytes([data[2] | 0x02]) + data[3:6] + b"\0" * 6 + \
                data[12:12 + len(parse_question(query)[4])]  # TC: ask again over TCP
        return data, delay

    def udp_loop(self) -> None:
        while not self.stopped:
            try:
                query, peer = self.udp.recvfrom(4096)
            except OSError:
                return
            data, delay = self.reply(query, True)
            if data is not None and delay:
                timer = threading.Timer(delay, self.send, (data, peer))
                timer.daemon = True
                timer.start()
            elif data is not None:
                self.send(data, peer)

    def send(self, data: bytes, peer: Any) -> None:
        with contextlib.suppress(OSError):
            self.udp.sendto(data, peer)

    def tcp_loop(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self.serve_tcp, args=(conn,), daemon=True).start()

    def serve_tcp(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError, struct.error):
            conn.settimeout(30)
            while True:
                size = struct.unpack("!H", read_exactly(conn, 2))[0]
                data, delay = self.reply(read_exactly(conn, size), False)
                if data is None:
                    read_exactly(conn, 1)  # silent: hold the connection until it goes
                    return
                time.sleep(delay)  # a slow DNS (this connection's own thread)
                conn.sendall(struct.pack("!H", len(data)) + data)

    def stop(self) -> None:
        self.stopped = True
        for sock in (self.udp, self.tcp):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


class DnsNamespace:
    """A mount + network namespace (held by an `unshare` process) whose loopback
    is up and whose /etc/resolv.conf says `nameserver 127.0.0.1`."""

    def __init__(self, tmp: Path, options: str = "") -> None:
        resolv = tmp / "resolv.conf"
        resolv.write_text(f"nameserver 127.0.0.1\n{options}\n")
        script = (f'ip link set lo up && ip route add {SILENT_NET} dev lo && '
                  'mount --bind "$0" /etc/resolv.conf && echo ready && exec cat >/dev/null')
        self.proc = guarded_popen(["unshare", "-m", "-n", "sh", "-c", script, str(resolv)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()  # `unshare` fails at once or says ready
        if ready != b"ready\n":
            _, err = self.proc.communicate(timeout=10)
            release(self.proc)
            raise OSError(err.decode(errors="replace").strip() or "unshare failed")
        self.pid = self.proc.pid

    @property
    def prefix(self) -> list[str]:
        """A command prefix that runs a program inside both namespaces."""
        return ["nsenter", f"--target={self.pid}", "--mount", "--net"]

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """This thread in the namespace's network (sockets made meanwhile stay
        there; threads started meanwhile start there)."""
        mine = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        theirs = os.open(f"/proc/{self.pid}/ns/net", os.O_RDONLY)
        try:
            setns(theirs)
            try:
                yield
            finally:
                setns(mine)
        finally:
            os.close(mine)
            os.close(theirs)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        release(self.proc)


def setns(fd: int) -> None:
    """The calling thread into the network namespace of `fd` (os.setns: 3.12)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def namespace_or_skip(tmp: Path) -> DnsNamespace:
    """A `DnsNamespace`; without one (not root, or a container without
    CAP_SYS_ADMIN) the test skips, or fails under CI=true (CI runs as root)."""
    try:
        return DnsNamespace(tmp)
    except OSError as exc:
        message = f"no private mount + network namespace for a scripted DNS " \
                  f"(`unshare -m -n` as root): {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
