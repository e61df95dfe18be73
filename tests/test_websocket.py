"""WebSocket (Upgrade) through the balancer, against a real RFC 6455 echo backend.

The tunnel opens only when the backend answers 101; any other answer keeps the
client connection plain HTTP.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import struct
import threading
import time

import pytest
import websocket  # websocket-client

from tests.rawpeer import serve_each
from tests.support import Backend, Balancer, split_responses, wait_for

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE = 0x1, 0x2, 0x8


# a WebSocket echo server on raw sockets --------------------------------------------
class Reader:
    """Buffered exact reads from a socket; None at end of stream."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def until(self, marker: bytes) -> bytes | None:
        while marker not in self.buf:
            if not self._fill():
                return None
        head, _, self.buf = self.buf.partition(marker)
        return head

    def exactly(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not self._fill():
                return None
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)


def encode_frame(opcode: int, payload: bytes, mask: bool) -> bytes:
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, (0x80 if mask else 0) | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, (0x80 if mask else 0) | 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, (0x80 if mask else 0) | 127, size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_frame(reader: Reader) -> tuple[int, bytes] | None:
    head = reader.exactly(2)
    if head is None:
        return None
    opcode, size = head[0] & 0x0F, head[1] & 0x7F
    if size == 126:
        size = struct.unpack("!H", reader.exactly(2))[0]
    elif size == 127:
        size = struct.unpack("!Q", reader.exactly(8))[0]
    key = reader.exactly(4) if head[1] & 0x80 else None
    payload = reader.exactly(size) if size else b""
    if key:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return opcode, payload


class WsEcho:
    """Echoes every frame; `/push` sends ten frames 0.1 s apart instead. When the
    client half-closes, it answers one last text frame `bye`, then closes."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.handshakes: list[dict[str, str]] = []
        self.closed_by_peer = threading.Event()
        serve_each(self.listener, self.serve)

    def serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            reader = Reader(conn)
            head = reader.until(b"\r\n\r\n")
            if head is None:
                return
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (line.partition(":") for line in lines[1:])}
            headers[":path"] = lines[0].split()[1]
            self.handshakes.append(headers)
            accept = base64.b64encode(hashlib.sha1(headers["sec-websocket-key"].encode()
                                                   + GUID).digest())
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % accept)
            if headers[":path"] == "/push":
                for i in range(10):
                    time.sleep(0.1)
                    conn.sendall(encode_frame(TEXT, b"push %d" % i, mask=False))
            self.echo(conn, reader)

    def echo(self, conn: socket.socket, reader: Reader) -> None:
        while True:
            frame = read_frame(reader)
            if frame is None:  # the client half-closed: a last word, then close
                self.closed_by_peer.set()
                conn.sendall(encode_frame(TEXT, b"bye", mask=False))
                return
            opcode, payload = frame
            conn.sendall(encode_frame(opcode, payload, mask=False))
            if opcode == CLOSE:
                return

    def stop(self) -> None:
        self.listener.close()


def handshake(host: str, path: str = "/chat") -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (b"GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (path.encode(), host.encode(), key))


def read_101(reader: Reader) -> str:
    head = reader.until(b"\r\n\r\n")
    assert head is not None and head.startswith(b"HTTP/1.1 101 "), head
    return head.decode("latin-1")


# fixtures --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    echo, plain = WsEcho(), Backend("plain")
    hosts = {"ws.test": {"action": "proxy", "backends": [echo.address]},
             "plain.test": {"action": "proxy", "backends": [plain.address]}}
    bal = Balancer(tmp_path_factory.mktemp("ws"), hosts,
                   env={"BALANCER_TIMEOUTS_TUNNEL_IDLE": "0.5"})
    yield bal, echo, plain
    bal.stop()
    echo.stop()
    plain.stop()


def connect(bal: Balancer) -> tuple[socket.socket, Reader]:
    sock = socket.create_connection(("127.0.0.1", bal.port), timeout=5)
    return sock, Reader(sock)


# tests -----------------------------------------------------------------------------
def test_echo_with_a_websocket_client(servers):
    bal, echo, _ = servers
    ws = websocket.create_connection(f"ws://127.0.0.1:{bal.port}/chat", host="ws.test",
                                     timeout=5)
    try:
        for text in ("hello", "wörld", "x" * 1000):
            ws.send(text)
            assert ws.recv() == text
        blob = os.urandom(300_000)
        ws.send_binary(blob)
        assert ws.recv() == blob
    finally:
        ws.close()
    seen = echo.handshakes[-1]
    assert seen["upgrade"] == "websocket" and "upgrade" in seen["connection"].lower()
    assert seen["host"] == "ws.test" and seen["x-forwarded-for"] == "127.0.0.1"


def test_frames_sent_with_the_handshake_reach_the_backend(servers):
    bal, _, _ = servers
    sock, reader = connect(bal)
    with sock:
        sock.sendall(handshake("ws.test") + encode_frame(TEXT, b"early", mask=True))
        read_101(reader)
        assert read_frame(reader) == (TEXT, b"early")


def test_half_close_flows_both_ways(servers):
    bal, echo, _ = servers
    echo.closed_by_peer.clear()
    sock, reader = connect(bal)
    with sock:
        sock.sendall(handshake("ws.test"))
        read_101(reader)
        sock.sendall(encode_frame(TEXT, b"last", mask=True))
        sock.shutdown(socket.SHUT_WR)  # the client is done sending, still reading
        assert read_frame(reader) == (TEXT, b"last")
        assert read_frame(reader) == (TEXT, b"bye")  # sent after the backend saw EOF
        assert echo.closed_by_peer.is_set()
        assert read_frame(reader) is None  # then the backend closed: so does the tunnel


def test_idle_tunnel_is_closed_but_one_way_traffic_keeps_it(servers):
    bal, _, _ = servers  # tunnel_idle is 0.5 s
    sock, reader = connect(bal)
    with sock:
        sock.sendall(handshake("ws.test"))
        read_101(reader)
        started = time.monotonic()
        assert read_frame(reader) is None
        assert 0.4 <= time.monotonic() - started < 3
    sock, reader = connect(bal)
    with sock:
        sock.sendall(handshake("ws.test", "/push"))
        read_101(reader)
        pushes = [read_frame(reader) for _ in range(10)]  # over ~1 s, client silent
        assert pushes == [(TEXT, b"push %d" % i) for i in range(10)]


def test_upgrade_answered_200_keeps_the_connection_http(servers):
    bal, _, plain = servers
    sock = socket.create_connection(("127.0.0.1", bal.port), timeout=5)
    with sock:
        sock.sendall(handshake("plain.test", "/first"))
        data = b""
        while len(complete(data)) < 1:
            data += sock.recv(65536)
        status, headers, body = complete(data)[0]
        assert status == 200 and json.loads(body)["path"] == "/first"
        # bytes that would be a WebSocket frame are parsed as HTTP: no tunnel
        sock.sendall(encode_frame(TEXT, b"smuggled", mask=True))
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
        assert rest.startswith(b"HTTP/1.1 400 ")
    assert all(path != "smuggled" for _, path, _ in plain.requests)


def test_request_pipelined_after_a_refused_upgrade_is_answered(servers):
    bal, _, plain = servers
    sock = socket.create_connection(("127.0.0.1", bal.port), timeout=5)
    with sock:
        sock.sendall(handshake("plain.test", "/up") +
                     b"GET /after HTTP/1.1\r\nHost: plain.test\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    answers = split_responses(data)
    assert [a[0] for a in answers] == [200, 200]
    assert [json.loads(a[2])["path"] for a in answers] == ["/up", "/after"]


def test_101_to_a_plain_request_is_a_bad_gateway(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{listener.getsockname()[1]}"

    def rogue() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n"
                         b"Connection: Upgrade\r\n\r\n")
            wait_for(lambda: conn.recv(1) == b"", timeout=5, what="the balancer to hang up")

    thread = threading.Thread(target=rogue, daemon=True)
    thread.start()
    bal = Balancer(tmp_path, {"app.test": {"action": "proxy", "backends": [address],
                                           "retries": 0}})
    try:
        sock = socket.create_connection(("127.0.0.1", bal.port), timeout=5)
        with sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 502 ")
    finally:
        bal.stop()
        listener.close()
        thread.join(5)


def complete(data: bytes) -> list:
    """The complete Content-Length framed responses at the start of `data`."""
    try:
        answers = split_responses(data)
    except (ValueError, IndexError):
        return []
    return [a for a in answers if len(a[2]) == int(a[1].get("content-length", 0))]
