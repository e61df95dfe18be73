"""The built-in backend: a small gevent HTTP/1.1 server that answers every
request with the suite's page. Used when nginx is not installed, and by the
tests. Run it as ``python -m loadtest.backend --listen 127.0.0.1:PORT``;
``--delay SECONDS`` makes every answer wait that long first (an app's time,
so that requests are in flight when a backend goes: the `deploy` scenario).

Invariants: keep-alive unless the client asks to close (or speaks HTTP/1.0
without keep-alive); request bodies announced by Content-Length are read and
dropped; anything it cannot parse closes the connection.
"""

from __future__ import annotations

import argparse

import gevent
from gevent.pool import Pool
from gevent.server import StreamServer

from loadtest.configs import BACKLOG
from loadtest.limits import raise_nofile
from loadtest.page import PAGE

MAX_HEAD = 65536
DELAY = [0.0]  # seconds before each answer (set once by main)
RESPONSE_KEEP = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
    b"Content-Length: %d\r\n\r\n" % len(PAGE)
) + PAGE
RESPONSE_CLOSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(PAGE)
) + PAGE


def _head_facts(head: bytes) -> tuple[bool, int]:
    """(keep_alive, content_length) of a request head."""
    lines = head.split(b"\r\n")
    keep_alive = not lines[0].endswith(b"HTTP/1.0")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"connection":
            value = value.strip().lower()
            keep_alive = value != b"close" and (keep_alive or value == b"keep-alive")
        elif name == b"content-length":
            length = int(value.strip())
    return keep_alive, length


def handle(sock, address) -> None:
    """Serve one client connection until it closes or asks to."""
    buffer = b""
    try:
        while True:
            end = buffer.find(b"\r\n\r\n")
            while end < 0:
                chunk = sock.recv(65536)
                if not chunk or len(buffer) > MAX_HEAD:
                    return
                buffer += chunk
                end = buffer.find(b"\r\n\r\n")
            keep_alive, length = _head_facts(buffer[:end])
            buffer = buffer[end + 4:]
            while len(buffer) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            buffer = buffer[length:]
            if DELAY[0]:
                gevent.sleep(DELAY[0])
            sock.sendall(RESPONSE_KEEP if keep_alive else RESPONSE_CLOSE)
            if not keep_alive:
                return
    except (OSError, ValueError):
        return
    finally:
        sock.close()


def serve(host: str, port: int, backlog: int = BACKLOG) -> None:
    """Run the backend forever on host:port."""
    raise_nofile()
    server = StreamServer((host, port), handle, backlog=backlog, spawn=Pool(None))
    server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m loadtest.backend --listen HOST:PORT``."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.backend")
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    parser.add_argument("--delay", type=float, default=0.0, metavar="SECONDS",
                        help="wait this long before each answer (default 0)")
    args = parser.parse_args(argv)
    DELAY[0] = max(0.0, args.delay)
    host, _, port = args.listen.rpartition(":")
    serve(host or "127.0.0.1", int(port))


if __name__ == "__main__":
    main()
