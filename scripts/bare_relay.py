"""A bare gevent + httptools relay: the calibration reference of bench_proxy.py.

``python scripts/bare_relay.py --listen 127.0.0.1:PORT --backend 127.0.0.1:PORT``

No features: no routing, no header rewriting, no limits, no timeouts, no
stats. Client requests are parsed with httptools and relayed byte for byte to
one backend over pooled keep-alive connections; the response is parsed with
httptools to find its end and relayed byte for byte. It assumes well-formed,
bodyless GET requests and length-delimited responses (what wrk sends and
nginx answers), so it measures what the concurrency model and the parser cost
and nothing else. Like the balancer it waits for readability before the
reads that follow a send (one io watcher per socket), so the comparison is
of features, not of I/O patterns. Not for production use.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import socket  # noqa: E402

import gevent  # noqa: E402
import httptools  # noqa: E402
from gevent.pool import Pool  # noqa: E402
from gevent.server import StreamServer  # noqa: E402


class Done:
    """httptools callback target: counts complete messages."""

    def __init__(self) -> None:
        self.complete = 0

    def on_message_complete(self) -> None:
        self.complete += 1


def watched(sock: socket.socket) -> tuple[socket.socket, object]:
    """`sock` with a read watcher kept for its life (waiting first skips EAGAIN)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock, gevent.get_hub().loop.io(sock.fileno(), 1)


def relay(client: socket.socket, backend: tuple[str, int], pool: list) -> None:
    hub = gevent.get_hub()
    client, readable = watched(client)
    requests = Done()
    parser = httptools.HttpRequestParser(requests)
    pending, first = b"", True
    try:
        while True:
            if not first:
                hub.wait(readable)
            first = False
            data = client.recv(65536)
            if not data:
                return
            parser.feed_data(data)
            pending += data
            wanted, requests.complete = requests.complete, 0
            if not wanted:
                continue  # the head is split over reads: forward it whole
            answer = ask(pool, backend, pending, wanted) or ask([], backend, pending, wanted)
            if answer is None:
                return
            client.send(answer)
            pending = b""
    finally:
        readable.close()


def ask(pool: list, backend: tuple[str, int], request: bytes, wanted: int) -> bytes | None:
    """The `wanted` responses to `request`, or None if the backend closed first
    (a pooled connection it timed out: the caller retries on a new one)."""
    hub = gevent.get_hub()
    upstream, readable = pool.pop() if pool else watched(socket.create_connection(backend))
    upstream.send(request)
    answer = Done()
    rparser = httptools.HttpResponseParser(answer)
    out = []
    while answer.complete < wanted:
        hub.wait(readable)
        chunk = upstream.recv(65536)
        if not chunk:
            readable.close()
            upstream.close()
            return None
        rparser.feed_data(chunk)
        out.append(chunk)
    pool.append((upstream, readable))
    return b"".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--backend", required=True, help="HOST:PORT")
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    bhost, bport = args.backend.rsplit(":", 1)
    pool: list = []
    backend = (bhost, int(bport))
    server = StreamServer((host, int(port)), lambda s, a: relay(s, backend, pool),
                          spawn=Pool(20000), backlog=4096)
    server.serve_forever()


if __name__ == "__main__":
    main()
