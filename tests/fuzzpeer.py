"""The request framing fuzzer's runner: each case of tests/framefuzz.py goes
through a real proxy to a `RecordingBackend`, and what reached the backend is
held against what the client's bytes mean (tests/refhttp.py).

Invariants checked per case (`check`), each failure a line of `Outcome.faults`:
* every request the backend got is one the client sent, in order, with the
  body its framing meant (the strict reading, or the lenient one where the RFC
  lets a recipient choose), and well framed itself (the backend reads it
  strictly): no request smuggled into another's body, nor out of one;
* a request that must be refused gets an error (4xx/5xx) and the connection
  closes after it; nothing from it on is forwarded;
* no trailer field that only a head may carry (framing, Host) is forwarded.

``python -m tests.fuzzcli`` runs a seeded batch (tests/fuzzcli.py).
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from tests import refhttp
from tests.framefuzz import CASE_FIELD, Case, case
from tests.rawpeer import serve_each

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
TAG = re.compile(rb"/([fs])(\d+)(?:-(\d+))?")
CLOSE_WAIT = 2.0  # how long a connection may stay open after an error answer
WAIT = 5.0  # how long the proxy may be silent before the case ends (`Batch.quiet`)
CUT_IDS = 10_000_000  # the case ids of `run_cuts` (its cases tagged apart from a batch's)
HEAD_ONLY = frozenset((b"content-length", b"transfer-encoding", b"host", b"connection", b"te",
                       b"trailer", b"expect", b"upgrade", b"keep-alive"))


@dataclass
class Received:
    request: refhttp.Request
    case_id: int  # the case its tags name (`traced`; -1: none)
    running: int  # the case being run when it arrived (what names one with no tag)


def traced(request: refhttp.Request) -> int:
    """The case a forwarded request belongs to: the one its `CASE_FIELD` names
    (no operator changes that field), else its target's tag, else -1."""
    for tagged in (*request.values(CASE_FIELD.lower()), request.host + request.path):
        match = TAG.search(b"/" + tagged)
        if match:
            return int(match.group(2))
    return -1


class RecordingBackend:
    """Reads each connection's requests strictly (`refhttp`) as they come and
    answers each OK; what it cannot read is a fault, and ends the connection."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.unreadable: list[tuple[int, bytes, str]] = []  # (case, bytes, reason)
        self.case_id = -1  # the case being run (faults without a tag go to it)
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        serve_each(self.listener, self._serve)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(60)
        buffer, pos = b"", 0
        with conn:
            while True:
                try:
                    more = conn.recv(65536)
                except OSError:
                    return
                if not more:
                    return
                buffer += more
                reading = refhttp.read_stream(buffer[pos:], framing_only=True)
                for request in reading.requests:
                    with self.lock:
                        self.received.append(Received(request, traced(request),
                                                      self.case_id))
                    try:
                        conn.sendall(OK)
                    except OSError:
                        return
                if reading.requests:
                    pos += reading.requests[-1].end
                if reading.end == "refused" or (reading.requests
                                                and not reading.requests[-1].keep_alive):
                    if reading.end == "refused":
                        with self.lock:
                            self.unreadable.append((self.case_id, buffer[pos:][:300],
                                                    reading.reason))
                    return

    def of_case(self, case_id: int) -> list[refhttp.Request]:
        with self.lock:
            return [r.request for r in self.received if r.case_id == case_id]

    def stop(self) -> None:
        self.listener.close()


@dataclass
class Outcome:
    case: Case
    statuses: list[int]  # the final answers, in order
    closed: bool | None  # the proxy closed the connection (None: after our half-close)
    forwarded: list[refhttp.Request] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # choices the RFC allows

    def signature(self) -> tuple:
        return (tuple(self.statuses),
                tuple((r.path, r.body, tuple(n for n, _ in r.trailers)) for r in self.forwarded))


def response_statuses(data: bytes) -> tuple[list[int], bool]:
    """The final statuses of the responses in `data`, and whether the last is whole."""
    statuses, pos = [], 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            return statuses, False
        head = data[pos:end]
        try:
            status = int(head[9:12])
        except ValueError:
            return statuses, False
        match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        length = int(match.group(1)) if match else 0
        if not match and status >= 200 and status not in (204, 304):
            length = len(data) - end - 4  # delimited by the close
        pos = end + 4 + length
        if status >= 200:
            statuses.append(status)
    return statuses, pos == len(data)


def unread(port: int, client_port: int) -> int | None:
    """The bytes waiting in the proxy's receive queue of its connection from
    `client_port` (/proc/net/tcp), None once that connection is gone."""
    local, remote = f"0100007F:{port:04X}", f"0100007F:{client_port:04X}"
    with open("/proc/net/tcp") as table:
        for line in table:
            fields = line.split()
            if fields[1] == local and fields[2] == remote:
                return int(fields[4].split(":")[1], 16)
    return None


def read_by_proxy(port: int, client_port: int) -> None:
    """Wait (bounded) until the proxy has read every byte sent so far: the next
    piece then comes in a read of its own."""
    deadline = time.monotonic() + WAIT
    while unread(port, client_port) and time.monotonic() < deadline:
        time.sleep(0.001)


def exchange(port: int, item: Case, strict: refhttp.Reading, lenient: refhttp.Reading,
             quiet: float = WAIT, apart: bool = False) -> tuple[list[int], bool | None]:
    """Send the case's bytes (cut at its `splits`; `apart`: each piece read by the
    proxy before the next is sent) and read the answers: our half-close at once
    when nothing must be refused, else only once the lenient reading's answers
    all came (an error answer must close)."""
    refuse = strict.end == "refused"
    data, bounds = item.data, [0, *item.splits, len(item.data)]
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for a, b in zip(bounds, bounds[1:], strict=False):
                if apart and a:
                    read_by_proxy(port, sock.getsockname()[1])
                sock.sendall(data[a:b])
            if not refuse:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        received, half_closed = b"", not refuse
        deadline = time.monotonic() + quiet
        while time.monotonic() < deadline:
            statuses, whole = response_statuses(received)
            if refuse and whole and statuses and statuses[-1] >= 400:
                deadline = min(deadline, time.monotonic() + min(CLOSE_WAIT, quiet))
            elif (refuse and not half_closed and whole and lenient.end != "refused"
                  and statuses == [200] * len(lenient.requests)):
                sock.shutdown(socket.SHUT_WR)
                half_closed = True
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                more = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                more = b""
            if not more:
                return response_statuses(received)[0], None if half_closed else True
            received += more
            deadline = max(deadline, time.monotonic() + quiet)
        return response_statuses(received)[0], False


def same(got: refhttp.Request, sent: refhttp.Request) -> bool:
    # (an HTTP/1.0 request without Host goes with one the proxy chose)
    return (got.method == sent.method and got.path == sent.path and got.body == sent.body
            and (not sent.host or got.host.lower() == sent.host.lower()))


def check(item: Case, statuses: list[int], closed: bool | None,
          forwarded: list[refhttp.Request]) -> Outcome:
    """The outcome of one case (module doc)."""
    out = Outcome(item, statuses, closed, forwarded)
    strict, lenient = refhttp.read_stream(item.data), refhttp.read_stream(item.data, True)
    reading = None
    for candidate in (strict, lenient):
        if (len(forwarded) <= len(candidate.requests)
                and all(same(g, s) for g, s in zip(forwarded, candidate.requests, strict=False))):
            reading = candidate
            break
    if reading is None:
        out.faults.append("forwarded otherwise than the client's framing: %r"
                          % [(r.method, r.path, r.body[:40]) for r in forwarded])
        return out
    if reading is lenient and len(forwarded) > len(strict.requests):
        out.notes.append("read leniently where a refusal was allowed: " + strict.reason)
    for request in forwarded:
        bad = [n for n, _ in request.trailers if n in HEAD_ONLY]
        if bad:
            out.faults.append(f"trailer fields only a head may carry forwarded: {bad!r}")
    if statuses[:len(forwarded)] != [200] * min(len(forwarded), len(statuses)):
        out.faults.append(f"answers {statuses!r} for {len(forwarded)} forwarded requests")
    after = statuses[len(forwarded):]
    if len(forwarded) < len(reading.requests) or reading.end == "refused":
        if not after:
            if reading.end != "incomplete" or len(forwarded) < len(reading.requests):
                out.notes.append("closed without an answer")
        elif after[0] < 400:
            out.faults.append(f"a request that must be refused answered {after[0]}")
        elif len(after) > 1:
            out.faults.append(f"answers after an error: {statuses!r}")
        elif closed is False:
            out.faults.append("the connection stayed open after the error answer")
        elif (len(forwarded) == len(reading.requests) and reading.statuses
              and after[0] not in reading.statuses):
            out.notes.append(f"answered {after[0]} where {reading.statuses!r} was expected "
                             f"({reading.reason})")
        if len(forwarded) < len(reading.requests):
            out.notes.append(f"refused a request the reading accepts "
                             f"({len(forwarded) + 1} of {len(reading.requests)})")
    return out


def run_case(port: int, backend: RecordingBackend, item: Case, quiet: float = WAIT,
             apart: bool = False) -> tuple[list[int], bool | None]:
    backend.case_id = item.case_id
    strict, lenient = refhttp.read_stream(item.data), refhttp.read_stream(item.data, True)
    return exchange(port, item, strict, lenient, quiet, apart)


def settled(backend: RecordingBackend) -> None:
    """Wait (bounded) until the backend has received nothing new for a while: a
    request forwarded after its client's connection closed is counted too."""
    seen, quiet_since = -1, time.monotonic()
    deadline = quiet_since + WAIT
    while time.monotonic() < deadline:
        with backend.lock:
            count = len(backend.received) + len(backend.unreadable)
        if count != seen:
            seen, quiet_since = count, time.monotonic()
        elif time.monotonic() - quiet_since > 0.3:
            return
        time.sleep(0.05)


def run_cuts(port: int, backend: RecordingBackend, seed: int, count: int,
             longest: int = 200) -> list[Outcome]:
    """The first `count` cases of `seed` of at most `longest` bytes, each cut in
    two at every byte, the proxy reading the first piece before the second
    comes: the partial reads a whole batch seldom makes (a head, a size line,
    a body cut anywhere)."""
    runs, n = [], 0
    while count:
        n += 1
        size = len(case(seed, n, CUT_IDS + n * 1000).data)  # (ids of as many digits)
        if size > longest:
            continue
        count -= 1
        for cut in range(1, size):
            item = case(seed, n, CUT_IDS + n * 1000 + cut)
            item.splits = [cut]
            runs.append((item, *run_case(port, backend, item, apart=True)))
    settled(backend)
    outcomes = [check(item, statuses, closed, backend.of_case(item.case_id))
                for item, statuses, closed in runs]
    blame(backend, outcomes)
    return outcomes


def serves(port: int) -> bool:
    """Whether the proxy still answers a plain request (the worker kept serving)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(b"GET /alive HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        data = b""
        while more := sock.recv(65536):
            data += more
    return data.startswith(b"HTTP/1.1 200 ")


def run_batch(port: int, backend: RecordingBackend, seed: int, count: int,
              start: int = 0, quiet: float = WAIT) -> list[Outcome]:
    """Cases `start` to `start + count` of `seed`, checked (`quiet`: how long a
    proxy may be silent before a case ends)."""
    runs, stopped = [], ""
    for n in range(start, start + count):
        item = case(seed, n)
        runs.append((item, *run_case(port, backend, item, quiet)))
        if n % 50 == 49 and not serves(port):
            stopped = "the proxy stopped serving"
            break
    settled(backend)
    outcomes = [check(item, statuses, closed, backend.of_case(item.case_id))
                for item, statuses, closed in runs]
    if stopped or not serves(port):
        outcomes[-1].faults.append("the proxy stopped serving")
    blame(backend, outcomes)
    return outcomes


def blame(backend: RecordingBackend, outcomes: list[Outcome]) -> None:
    """Add to `outcomes` what the backend could not read, and each request of no
    case (every request the generator makes names its case twice: `traced`), as
    faults of the case that was running when it arrived (bug: a request of no
    case was a fault of the batch's last case)."""
    by_id = {out.case.case_id: out for out in outcomes}
    with backend.lock:
        for case_id, data, reason in backend.unreadable:
            by_id.get(case_id, outcomes[-1]).faults.append(
                f"the backend could not read {data!r} ({reason})")
        for got in backend.received:
            if got.case_id < 0 and got.request.path != b"/alive":
                request = got.request
                by_id.get(got.running, outcomes[-1]).faults.append(
                    f"a request of no case forwarded while this case ran: "
                    f"{(request.method, request.host, request.path)!r}")


def shown(data: bytes, room: int = 400) -> str:
    """`data` as a literal, cut to about `room` characters."""
    text = repr(data)
    return text if len(text) <= room else f"{text[:room]}... ({len(data)} bytes)"


def summary(outcomes: list[Outcome]) -> str:
    lines = [f"{len(outcomes)} cases"]
    notes: Counter = Counter()
    examples: dict[tuple, Outcome] = {}
    for out in outcomes:
        for note in out.notes:
            key = (note.split(" (")[0], tuple(out.case.labels))
            notes[key] += 1
            examples.setdefault(key, out)
    for (note, labels), count in notes.most_common():
        example = examples[note, labels]
        lines.append(f"  note x{count}: {note} {list(labels)} answers {example.statuses}\n"
                     f"    {shown(example.case.data)}")
    for out in outcomes:
        for fault in out.faults:
            lines.append(f"FAULT case {out.case.case_id} {out.case.labels}: {fault}\n"
                         f"    {shown(out.case.data)}")
    return "\n".join(lines)
