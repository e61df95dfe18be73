"""A scripted raw-socket backend: it records every request byte for byte and
answers with whatever bytes (and pauses) its script writes.

For tests of what the balancer forwards and how it copes with odd or hostile
backend output; binds 127.0.0.1:0, every read is bounded by a timeout.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import httptools

# script(connection, raw request bytes) -> keep the connection open for another request?
Script = Callable[[socket.socket, bytes], bool]


class _Complete:
    """httptools protocol noting where the message ends."""

    def __init__(self) -> None:
        self.done = False

    def on_message_complete(self) -> None:
        self.done = True


def read_request(conn: socket.socket, inbound: bytearray | None = None) -> bytes:
    """One whole request (head, body, trailers) as received; b"" at EOF.
    Every byte read is appended to `inbound` too, as it comes."""
    protocol = _Complete()
    parser = httptools.HttpRequestParser(protocol)
    data = b""
    while not protocol.done:
        try:
            chunk = conn.recv(65536)
        except OSError:
            return b""
        if not chunk:
            return b""
        data += chunk
        if inbound is not None:
            inbound += chunk
        try:
            parser.feed_data(chunk)
        except httptools.HttpParserUpgrade:
            return data
    return data


def read_until(conn: Any, end: bytes) -> bytes:
    """Read from `conn` (any socket-like object) until what came ends with `end`;
    a close before that fails the test."""
    data = b""
    while not data.endswith(end):
        more = conn.recv(65536)
        assert more, f"closed after {data!r}"
        data += more
    return data


def read_through(conn: Any, marker: bytes = b"\r\n\r\n") -> bytes | None:
    """Read from `conn` until `marker` has come (a head's end by default); what
    came, which may go past it, or None when the peer closed before."""
    data = b""
    while marker not in data:
        more = conn.recv(65536)
        if not more:
            return None
        data += more
    return data


def serve_each(listener: socket.socket, serve: Callable[[socket.socket], None]) -> None:
    """Accept on `listener` (in a thread) until it is closed, and serve each
    connection with `serve` in a thread of its own."""
    def accept_loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
    threading.Thread(target=accept_loop, daemon=True).start()


def cut(*sockets: socket.socket) -> None:
    """Shut down (a close alone leaves a socket another thread reads open), then close."""
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


class Link(NamedTuple):
    """One connection a `Relay` relays: the client's socket and its own upstream."""

    client: socket.socket
    upstream: socket.socket


class Relay:
    """A peer in the middle: listens on 127.0.0.1:0 (`port`) and relays each
    connection to `upstream` (host, port) byte for byte, a thread each way.
    Subclasses script what passes: `to_upstream` and `to_client` send on one read
    (as it came, by default). The end of one way is passed on (a half-close); an
    error either way shuts both down. `timeout`: how long one way may stay silent
    (None: for ever, as a subscriber's connection)."""

    def __init__(self, upstream: tuple[str, int], timeout: float | None = None) -> None:
        self.upstream = upstream
        self.timeout = timeout
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        serve_each(self.listener, self._relay)

    def to_upstream(self, link: Link, data: bytes) -> None:
        link.upstream.sendall(data)

    def to_client(self, link: Link, data: bytes) -> None:
        link.client.sendall(data)

    def close(self) -> None:
        """Stop accepting and cut every connection relayed."""
        self.listener.close()
        cut(*self.sockets)

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=self.timeout)
        except OSError:  # as a refused connect, to the client
            client.close()
            return
        link = Link(client, upstream)
        self.sockets += link
        back = threading.Thread(target=self._copy, args=(upstream, client, link, self.to_client),
                                daemon=True)
        back.start()
        self._copy(client, upstream, link, self.to_upstream)
        back.join()  # the upstream's end, or an error's
        for sock in link:
            sock.close()

    def _copy(self, source: socket.socket, sink: socket.socket, link: Link,
              forward: Callable[[Link, bytes], None]) -> None:
        source.settimeout(self.timeout)
        try:
            while data := source.recv(65536):
                forward(link, data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            for sock in link:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def sending(*pieces: bytes, pause: float = 0.0) -> Script:
    """A `RawBackend` script that writes `pieces`, `pause` seconds before each, and
    closes."""
    def script(conn: socket.socket, _request: bytes) -> bool:
        for piece in pieces:
            time.sleep(pause)
            conn.sendall(piece)
        return False
    return script


class RawBackend:
    """Accepts connections on 127.0.0.1:0 and serves each with `script` (over TLS
    with `tls`, a server context: a handshake that fails ends the connection)."""

    def __init__(self, script: Script, timeout: float = 10.0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.timeout = timeout
        self.tls = tls
        self.requests: list[bytes] = []  # each whole request, once complete
        self.inbound = bytearray()  # every byte received, as it comes
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        serve_each(self.listener, self._serve)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self, conn: socket.socket) -> None:
        self.connections.append(conn)
        conn.settimeout(self.timeout)
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError:
                conn.close()
                return
            self.connections.append(conn)
        with conn:
            while True:
                request = read_request(conn, self.inbound)
                if not request:
                    return
                self.requests.append(request)
                try:
                    if not self.script(conn, request):
                        return
                except OSError:
                    return

    def stop(self) -> None:
        self.listener.close()
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def head_fields(request: bytes) -> list[tuple[str, str]]:
    """The (lower-case name, value) fields of a raw request head, in order."""
    head = request.partition(b"\r\n\r\n")[0].decode("latin-1")
    fields = []
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        fields.append((name.strip().lower(), value.strip()))
    return fields


def client_exchange(port: int, data: bytes, *, until: bytes | None = None,
                    timeout: float = 10.0) -> bytes:
    """Send `data` on a new connection; read until `until` appears in what came
    back (or the server closes, or `timeout`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while until is None or until not in received:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
        return received


def refused(port: int, data: bytes, timeout: float = 10.0) -> tuple[bytes, bool]:
    """What the balancer answered `data` on a new connection, and whether it closed
    the connection after it (a read that times out: not closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while b"</html>" not in received:
            more = sock.recv(65536)
            if not more:
                return received, True
            received += more
        sock.settimeout(1.0)  # (what a closed connection gives at once)
        try:
            closed = sock.recv(65536) == b""
        except OSError:
            closed = False
        return received, closed
