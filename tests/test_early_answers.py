"""A backend that answers before the request body is all sent (an upload refused
with 401 or 413 after its head, RFC 9112 §9.3, or a complete 200 at once),
through a real balancer: the client gets that answer, not a 502 (the backend
closed while the body went out) nor a 504 (it stopped reading); its
connection closes after it (the rest of its body is not read), and the
backend's connection is never reused. An early success still coming (its
head at once, its body once the backend read the whole upload) gets the
whole body, and an unasked 100 changes nothing.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest

from tests.rawpeer import read_through, read_until, serve_each
from tests.support import Balancer, wait_for
from tests.tlsbackend import server_context
from tests.tlsca import TestCA

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

WAIT = 10.0  # seconds any step may take before the test fails
BLOCK = b"x" * 65536
TOO_BIG = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!"
TAKEN = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\ntaken"


class EarlyBackend:
    """Reads a request head only, answers `answer`, then closes (`close`) or
    keeps the connection open without reading another byte. With `linger` it
    reads and drops what still comes before closing, as nginx's lingering
    close does: a backend that closes at once resets a connection its peer
    still writes to, and the kernel then drops its answer unread (a race the
    balancer cannot win over TLS, where a failed write ends the session)."""

    def __init__(self, answer: bytes, close: bool, context: ssl.SSLContext | None = None,
                 linger: bool = False) -> None:
        self.answer = answer
        self.close = close
        self.linger = linger
        self.context = context  # serves HTTPS with it
        self.accepted = 0
        self.stopped = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        serve_each(self.listener, self._serve)

    def _serve(self, conn: socket.socket) -> None:
        self.accepted += 1
        conn.settimeout(WAIT)
        if self.context is not None:
            try:
                conn = self.context.wrap_socket(conn, server_side=True)
            except OSError:
                return
        with conn:
            if read_through(conn) is None:
                return
            conn.sendall(self.answer)
            if not self.close:
                self.stopped.wait(WAIT)
            elif self.linger:
                drain(conn)

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()


def drain(conn: socket.socket) -> None:
    """Read and drop until the peer closes, for at most WAIT seconds."""
    deadline = time.monotonic() + WAIT
    try:
        while time.monotonic() < deadline and conn.recv(65536):
            pass
    except OSError:
        return


def upload(port: int, host: bytes, framing: bytes) -> tuple[bytes, float]:
    """Send a 50 MB body (as fast as it goes) while reading the answer until the
    balancer closes; returns the answer and how long it took."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    chunked = framing.startswith(b"Transfer-Encoding")
    block = b"10000\r\n" + BLOCK + b"\r\n" if chunked else BLOCK
    done = threading.Event()

    def pump() -> None:
        try:
            for _ in range(800):  # 50 MB, bounded
                if done.is_set():
                    return
                sock.sendall(block)
        except OSError:
            return

    sock.sendall(b"POST /upload HTTP/1.1\r\nHost: " + host + b"\r\n" + framing + b"\r\n\r\n")
    started = time.monotonic()
    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    data = b""
    try:
        while time.monotonic() - started < WAIT:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
    finally:
        done.set()
        sock.close()
        sender.join(WAIT)
    return data, time.monotonic() - started


class ReadingBackend(EarlyBackend):
    """Answers `answer` after the head, then reads the whole Content-Length body
    (noting its length in `got`) and sends `then` % {"got": that length as
    digits, "size": their count}, if any."""

    def __init__(self, answer: bytes, then: bytes = b"") -> None:
        super().__init__(answer, close=True)
        self.then = then
        self.got: list[int] = []

    def _serve(self, conn: socket.socket) -> None:
        self.accepted += 1
        conn.settimeout(WAIT)
        with conn:
            data = read_through(conn)
            if data is None:
                return
            conn.sendall(self.answer)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            received = len(body)
            while received < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                received += len(chunk)
            self.got.append(received)
            if self.then:
                got = b"%d" % received
                conn.sendall(self.then % {b"got": got, b"size": len(got)})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    """One balancer: close.test's backend answers 413 early and closes,
    stop.test's answers it and stops reading, tls.test's (HTTPS) answers and
    closes once the balancer does (lingering), ok-stop.test's, ok-stop2.test's
    and ok-close.test's answer 200 (complete) early and stop reading or close
    (a backend that stops reading serves one test: the pooled connection of
    its `get` never reads again),
    iis.test's sends 100 unasked, duplex.test's sends a 201 head at once, reads
    the whole body and then sends the 201's body."""
    tmp = tmp_path_factory.mktemp("early")
    ca = TestCA()
    backends = {"close.test": EarlyBackend(TOO_BIG, close=True),
                "stop.test": EarlyBackend(TOO_BIG, close=False),
                "tls.test": EarlyBackend(TOO_BIG, close=True, linger=True,
                                         context=server_context(ca, tmp, "tls.test")),
                "iis.test": ReadingBackend(b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 200 OK\r\n"
                                           b"Content-Length: %(size)d\r\n\r\n%(got)s"),
                "ok-stop.test": EarlyBackend(TAKEN, close=False),
                "ok-stop2.test": EarlyBackend(TAKEN, close=False),
                "ok-close.test": EarlyBackend(TAKEN, close=True),
                "duplex.test": ReadingBackend(b"HTTP/1.1 201 Created\r\nContent-Length: 7\r\n\r\n",
                                              b"%(got)s")}
    hosts = {host: {"action": "proxy", "backends": [backend.address]}
             for host, backend in backends.items()}
    hosts["tls.test"]["backends"] = ["https://" + backends["tls.test"].address]
    bal = Balancer(tmp, hosts, config=f'[tls]\nbackend_ca_bundle = "{ca.write(tmp)}"\n'
                                      "[timeouts]\nbackend_read = 30.0\n")
    yield bal, backends
    bal.stop()
    for backend in backends.values():
        backend.stop()


def get(port: int, host: bytes) -> bytes:
    """A GET with Connection: close; the whole answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer
    finally:
        sock.close()


@pytest.mark.parametrize(("host", "framing", "answer"), [
    (b"close.test", b"Content-Length: 52428800", TOO_BIG),
    (b"stop.test", b"Transfer-Encoding: chunked", TOO_BIG),
    (b"tls.test", b"Content-Length: 52428800", TOO_BIG),
    (b"ok-stop.test", b"Content-Length: 52428800", TAKEN),
    (b"ok-stop2.test", b"Transfer-Encoding: chunked", TAKEN),
    (b"ok-close.test", b"Content-Length: 52428800", TAKEN),
], ids=["closes-length", "stops-reading-chunked", "https-lingers-length",
        "200-stops-reading-length", "200-stops-reading-chunked", "200-closes-length"])
def test_an_answer_before_the_body_reaches_the_client(site, host: bytes, framing: bytes,
                                                      answer: bytes) -> None:
    bal, backends = site
    backend = backends[host.decode()]
    accepted = backend.accepted
    data, took = upload(bal.port, host, framing)
    status, _, expected = answer.partition(b"\r\n")
    assert data.startswith(status + b"\r\n"), data[:200]
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close" in head and body == expected.partition(b"\r\n\r\n")[2]
    assert took < WAIT  # not the 30 s backend_read
    # the next request gets a new backend connection, never the cut one
    assert get(bal.port, host).startswith(status + b"\r\n")
    assert backend.accepted == accepted + 2


def put_3mb(port: int, host: bytes, last: bytes) -> bytes:
    """PUT a 3 MiB body in full, then read until the answer ends with `last`."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    try:
        sock.sendall(b"PUT / HTTP/1.1\r\nHost: " + host + b"\r\nContent-Length: 3145728\r\n\r\n")
        for _ in range(48):
            sock.sendall(BLOCK)
        return read_until(sock, last)
    finally:
        sock.close()


def test_an_unasked_100_while_the_body_goes_leaves_the_upload_whole(site) -> None:
    bal, _ = site
    answer = put_3mb(bal.port, b"iis.test", b"\r\n\r\n3145728")
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"), answer
    assert b"Connection: close" not in answer


def test_an_early_success_still_coming_gets_the_whole_body(site) -> None:
    bal, backends = site
    answer = put_3mb(bal.port, b"duplex.test", b"\r\n\r\n3145728")
    assert answer.startswith(b"HTTP/1.1 201 Created\r\n") and b"Connection: close" not in answer
    wait_for(lambda: backends["duplex.test"].got, WAIT, what="the whole body at the backend")
    assert backends["duplex.test"].got == [3145728]
