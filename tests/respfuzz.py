"""The driving half of the response-side fuzz: a scripted backend that answers
each ``/case/N`` with case N's bytes (`tests/respfuzz_cases.py`), a strict
client, and the invariants checked on what a proxy in between made of them.

Per case, on one keep-alive client connection: the case's request, then
``GET /check/N``, which must get its own answer ("check N"): a proxy that lost
the framing would hand the client the case's leftovers instead. Checked:

* (a) the case's answer is what `Want` allows, read strictly (`read_response`:
  one framing, canonical chunks, nothing after a final response but the next);
  the check's answer is its own, on the same connection unless the proxy
  closed it after the case's;
* (b) no request reaches a backend connection after a case that was not
  one clean keep-alive response (the backend notes any: `Backend.misuses`);
* (c) every head the client gets is well-formed: CRLF lines, no NUL, no bare
  CR or LF, no folded line, tokens for names; no 1xx to an HTTP/1.0 client.

``python -m tests.respfuzz [--seed S] [--cases N] [--haproxy]`` runs the fuzz
against a fresh balancer (and HAProxy 2.6 with `--haproxy`), printing each
case's outcome where they differ.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.rawpeer import read_request, serve_each
from tests.respfuzz_cases import Case, generate

STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5]\d\d) [\t \x21-\x7e\x80-\xff]*\Z")
FIELD_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t \x21-\x7e\x80-\xff]*\Z")
SIZE_LINE = re.compile(rb"([0-9a-fA-F]+)(;[\t \x21-\x7e\x80-\xff]*)?\r\n")
WAIT = 5.0
# Never forwarded as trailers (a few of `balancer.response_parser.TRAILER_DROPPED`)
HEAD_ONLY = (b"content-length", b"transfer-encoding", b"connection", b"set-cookie", b"host")


class Backend:
    """Answers ``/case/N`` with `cases[N]`'s bytes and ``/check/N`` with "check N"
    (Content-Length, keep-alive); notes every request that reached a connection
    after a case that left it unusable (`misuses`)."""

    def __init__(self, cases: list[Case]) -> None:
        self.cases = cases
        self.misuses: list[str] = []
        self.pooled: dict[int, threading.Event] = {}  # the client has case N's answer
        self.strayed: dict[int, threading.Event] = {}  # its stray bytes were written
        for number, case in enumerate(cases):
            if case.stray:
                self.pooled[number] = threading.Event()
                self.strayed[number] = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        serve_each(self.listener, self._serve)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT * 2)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        spoilt = ""  # the case after which nothing may come on this connection
        with conn:
            try:
                while request := read_request(conn):
                    target = request.split(b" ", 2)[1].decode()
                    if spoilt:
                        self.misuses.append(f"{target} after {spoilt}")
                    kind, _, number = target.strip("/").partition("/")
                    if kind == "check":
                        body = b"check " + number.encode()
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                     % (len(body), body))
                        continue
                    case = self.cases[int(number)]
                    self._write(conn, int(number), case)
                    if case.close:
                        return
                    if not case.reusable:
                        spoilt = target
            except OSError:
                return

    def _write(self, conn: socket.socket, number: int, case: Case) -> None:
        for i, piece in enumerate(case.writes()):
            if i and case.pause:
                time.sleep(case.pause)  # the hostile backend's own pace
            conn.sendall(piece)
        if case.stray:
            if self.pooled[number].wait(WAIT):
                conn.sendall(case.stray)
            self.strayed[number].set()

    def stop(self) -> None:
        self.listener.close()


class Reader:
    """A client connection's bytes, read as they are needed (with a deadline)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.eof = False

    def more(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, ConnectionError):
            data = b""
        self.eof = not data
        self.buf += data
        return bool(data)

    def line(self) -> bytes | None:
        while (end := self.buf.find(b"\r\n")) < 0:
            if not self.more():
                return None
        line, self.buf = self.buf[:end], self.buf[end + 2:]
        return line

    def take(self, size: int) -> bytes | None:
        while len(self.buf) < size:
            if not self.more():
                return None
        data, self.buf = self.buf[:size], self.buf[size:]
        return data


@dataclass
class Answer:
    """What the client read: a response (`cut` if it ended early), or nothing."""

    status: int | None = None
    fields: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    interims: int = 0
    cut: bool = False
    trailers: list[bytes] = field(default_factory=list)  # their names, lower case
    problems: list[str] = field(default_factory=list)

    def field(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.fields if key == name]

    def closes(self) -> bool:
        return any(b"close" in value.lower() for value in self.field(b"connection"))


def read_head(reader: Reader, answer: Answer) -> bool:
    """One head into `answer` (strictly: `problems` for each malformed line)."""
    line = reader.line()
    if line is None:
        return False
    match = STATUS_LINE.match(line)
    if not match:
        answer.problems.append(f"status line {line[:80]!r}")
        return False
    answer.status = int(match.group(1))
    answer.fields = []
    while (line := reader.line()) is not None and line:
        if not FIELD_LINE.match(line) or b"\r" in line or b"\n" in line:
            answer.problems.append(f"field line {line[:80]!r}")
        name, _, value = line.partition(b":")
        answer.fields.append((name.lower(), value.strip(b" \t")))
    return line is not None


def read_body(reader: Reader, answer: Answer) -> None:
    te, cl = answer.field(b"transfer-encoding"), answer.field(b"content-length")
    if te and cl or len(cl) > 1 or len(te) > 1:
        answer.problems.append(f"framing {te} {cl}")
    if te:
        if te != [b"chunked"]:
            answer.problems.append(f"transfer-encoding {te}")
        read_chunked(reader, answer)
    elif cl:
        if not cl[0].isdigit():
            answer.problems.append(f"content-length {cl}")
            return
        data = reader.take(int(cl[0]))
        answer.cut = data is None
        answer.body = reader.buf if data is None else data
    else:
        while reader.more():
            pass
        answer.body, reader.buf = reader.buf, b""


def read_chunked(reader: Reader, answer: Answer) -> None:
    body = []
    while True:
        line = reader.line()
        match = SIZE_LINE.match(line + b"\r\n") if line is not None else None
        if match is None:
            answer.cut = line is None
            if line is not None:
                answer.problems.append(f"chunk size line {line[:40]!r}")
            break
        size = int(match.group(1), 16)
        if not size:
            while (line := reader.line()) and FIELD_LINE.match(line):
                answer.trailers.append(line.partition(b":")[0].lower())
            if line:
                answer.problems.append(f"trailer line {line[:40]!r}")
            answer.cut = line is None
            break
        data = reader.take(size + 2)
        if data is None or data[-2:] != b"\r\n":
            answer.cut = True
            break
        body.append(data[:-2])
    answer.body = b"".join(body)


def read_response(reader: Reader, method: bytes, version: bytes) -> Answer:
    """One response (after its interim ones), read strictly."""
    answer = Answer()
    while read_head(reader, answer):
        assert answer.status is not None
        if answer.status == 204 and (answer.field(b"content-length")
                                     or answer.field(b"transfer-encoding")):
            answer.problems.append("framing fields in a 204")
        if answer.status >= 200 or answer.status == 101:
            if method != b"HEAD" and answer.status not in (204, 304):
                read_body(reader, answer)
            return answer
        answer.interims += 1
        if version == b"1.0":
            answer.problems.append("1xx to an HTTP/1.0 client")
        if answer.field(b"content-length") or answer.field(b"transfer-encoding"):
            answer.problems.append("framing fields in a 1xx")
    answer.cut = answer.status is not None
    return answer


def verdict(case: Case, answer: Answer) -> list[str]:
    """What is wrong with `answer` to `case` (invariants a and c)."""
    problems = list(answer.problems)
    want = case.want
    got = {name for name, _ in answer.fields} | set(answer.trailers)
    if answer.status == want.status:
        problems += [f"{name!r} forwarded" for name in want.absent if name in got]
    problems += [f"{name!r} forwarded as a trailer" for name in answer.trailers
                 if name in HEAD_ONLY]
    # An HTTP/1.0 client's body ends with the connection: cut, it looks whole.
    cut = answer.cut or want.may_cut and case.version == b"1.0"
    if answer.status == 502:
        if not want.allows_502():
            problems.append("502 for a response that could be forwarded")
    elif answer.status is None:
        problems.append("no response")
    elif want.status is None:
        problems.append(f"{answer.status} for a response that cannot be framed")
    elif answer.status != want.status:
        problems.append(f"status {answer.status}, sent {want.status}")
    elif answer.cut and not want.may_cut:
        problems.append("cut short")
    elif answer.body != (want.body[:len(answer.body)] if cut else want.body):
        problems.append(f"body {answer.body[:60]!r}, sent {want.body[:60]!r}")
    return problems


def request(case_or_check: bytes, method: bytes = b"GET", version: bytes = b"1.1") -> bytes:
    keep = b"Connection: keep-alive\r\n" if version == b"1.0" else b""
    body = b"upload-" * 3 if method == b"POST" else b""
    length = b"Content-Length: %d\r\n" % len(body) if body else b""
    return (method + b" " + case_or_check + b" HTTP/" + version + b"\r\nHost: app.test\r\n"
            + keep + length + b"\r\n" + body)


def run_case(port: int, backend: Backend, number: int) -> tuple[str, list[str]]:
    """Case `number` then its check; its outcome in short and its problems."""
    case = backend.cases[number]
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    check_request = request(b"/check/%d" % number)
    try:
        sock.sendall(request(b"/case/%d" % number, case.method, case.version)
                     + (check_request if case.pipelined else b""))
        reader = Reader(sock)
        answer = read_response(reader, case.method, case.version)
        problems = verdict(case, answer)
        outcome = f"{answer.status}{' cut' if answer.cut else ''}"
        if number in backend.pooled:
            backend.pooled[number].set()
            backend.strayed[number].wait(WAIT)
        if reader.eof or answer.cut or answer.closes() or answer.status is None:
            sock.close()
            sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            reader = Reader(sock)
            outcome += " closed"
            sock.sendall(check_request)
        elif not case.pipelined:
            if reader.buf:
                problems.append(f"bytes after the response: {reader.buf[:60]!r}")
            sock.sendall(check_request)
        check = read_response(reader, b"GET", b"1.1")
        if (check.status, check.body, check.problems) != (200, b"check %d" % number, []):
            problems.append(f"check got {check.status} {check.body[:60]!r} {check.problems}")
        return outcome, problems
    finally:
        sock.close()


def run(port: int, backend: Backend) -> dict[int, tuple[str, list[str]]]:
    """Every case of `backend`, one after the other; (b) checked at the end."""
    results = {number: run_case(port, backend, number) for number in range(len(backend.cases))}
    for misuse in backend.misuses:
        number = int(misuse.rsplit("/", 1)[1])
        results[number][1].append(f"pooled connection reused: {misuse}")
    return results


def haproxy(backend: Backend, root: Path):  # pragma: no cover - a manual comparison
    from loadtest import configs
    from loadtest.procs import Processes, free_port, wait_for_port
    port = free_port()
    conf = root / "haproxy.cfg"
    conf.write_text(configs.haproxy(port, [backend.address], 4096, 1000))
    procs = Processes(root)
    wait_for_port(procs.start("haproxy", ["haproxy", "-db", "-f", str(conf)]), port)
    return port, procs


def main() -> None:  # pragma: no cover - a manual comparison
    import tempfile

    from tests.support import Balancer
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--haproxy", action="store_true")
    args = parser.parse_args()
    cases = generate(args.seed, args.cases)
    root = Path(tempfile.mkdtemp())
    backend = Backend(cases)
    bal = Balancer(root, {"app.test": {"action": "proxy", "backends": [backend.address]}},
                   args=["--workers", "1"])
    try:
        ours = run(bal.port, backend)
    finally:
        bal.stop()
    theirs: dict[int, tuple[str, list[str]]] = {}
    if args.haproxy:
        backend = Backend(cases)
        port, procs = haproxy(backend, root)
        try:
            theirs = run(port, backend)
        finally:
            procs.stop_all()
    for number, (outcome, problems) in ours.items():
        other = theirs.get(number, (outcome, []))
        if problems or other[0] != outcome:
            print(f"{number:4} {cases[number].name[:70]}\n     balancer {outcome} {problems}"
                  + (f"\n     haproxy  {other[0]} {other[1]}" if args.haproxy else ""))
    bad = sum(1 for _, problems in ours.values() if problems)
    print(f"{len(cases)} cases, {bad} with problems", file=sys.stderr)


if __name__ == "__main__":
    main()
