"""The balancer's per-request Python cost, without sockets, gevent or the kernel;
and (``--sockets``) the cost of a whole connection through a real gevent worker.

``python scripts/bench_hotpath.py [--requests 20000] [--instructions] [--access-log PATH]``
``python scripts/bench_hotpath.py --sockets close|keep-alive [--requests 1000] [--instructions]``
``python scripts/bench_hotpath.py --sockets keep-alive --vary [--browser] [--requests 1000]
[--instructions]``
``python scripts/bench_hotpath.py --sockets close|keep-alive --tls [--refuse-fronting]
[--requests 1000] [--instructions]``
``python scripts/bench_hotpath.py --sockets close|keep-alive --body SIZE [--chunked [CHUNK]]
[--requests 1000] [--instructions]``
``python scripts/bench_hotpath.py --sockets keep-alive --pipeline N [--body SIZE [--chunked]]
[--instructions]``

One `ClientConnection` from a real `Worker` (file-store-shaped table: ``*`` →
one backend) serves scripted sockets: the client socket hands out a wrk-like
``GET /index.html`` per read, the pooled backend connection answers every
request with nginx's head and the suite's 4.5 KB page in one read. So the
whole proxy path runs (parsing both ways, routing, header rewriting, request
id, retries and health bookkeeping, counters, response framing) and nothing
else: no syscalls, no event loop.

* default: µs per request, best of 5 passes (wall clock; noisy machines vary
  by 20 %);
* ``--instructions``: instructions per request under callgrind (valgrind
  must be installed): two runs of different lengths, the difference divided
  by the extra requests, so start-up cancels out. Deterministic to ~0.1 %
  (the runs fix PYTHONHASHSEED, 0 unless set): the figure to compare two
  versions of the code by.

``--sockets MODE`` runs the real thing in this process instead: a gevent
`Worker` (GeventIO, monkey-patched sockets) listening on loopback, in front
of a keep-alive backend that a helper process (``--peer``, never under
valgrind) runs along with a client making the requests one after another:
``close``, a new connection per request (``Connection: close``: accept,
greenlet, connection set-up, parse, proxy, close), or ``keep-alive``, every
request on one connection. The difference of the two per-request figures is
what a new connection costs the worker in user space (issue 21);
``--instructions`` counts it under callgrind the same way (the client and
the backend run outside valgrind, the kernel's share is not counted:
``strace -c`` counts the syscalls). wrk sends the same head byte for byte
every time, and so does the client here, which the parser and the forwarded
head's rewrite remember (`RequestParser.repeat_head`); ``--vary`` makes every
request's target differ (``/index.html?N``), as a browser's do, so that every
head is parsed and rewritten whole; ``--browser`` sends a browser's head
(Firefox's fields: 14 beside Host, 611 bytes) instead of wrk's (Host alone).
``--tls`` puts a TLS listener in front (TLS 1.3, an ECDSA P-256 certificate
made with `cryptography`, as `scripts/bench_proxy.py`'s): the client is the
helper's `ssl` socket, and the worker's OpenSSL work (a full handshake per
request with ``close``) is counted with the rest; ``--refuse-fronting`` turns
``tls.refuse_domain_fronting`` on (each request's Host checked against the
connection's certificate, which is stored as the Host's so that it passes).
``--body SIZE`` (bytes; ``K``/``M`` suffixes: 200, 16K, 10M) makes every request a
``POST`` with a Content-Length body of that size, sent with its head in one
``sendall`` (a small body comes in the head's read, a large one streams), which
the backend reads whole before it answers; the wall-clock run also prints the
worker's CPU time (user + system, this process: the helper is another) per
request. ``--instructions`` with a body of 1 MiB or more makes 2 and 12 requests
instead of 200 and 1,200. ``--chunked`` sends that body with ``Transfer-Encoding:
chunked`` instead, in chunks of CHUNK bytes (16K unless given; the last may be
shorter), head and whole body in one ``sendall`` as well; the backend reads the
chunked body to its last chunk. ``--connections N`` (keep-alive) spreads the
requests over N connections, each with one request in flight: the client sends
one on every connection, then reads every answer, so the worker finds up to N
readinesses at each poll, as under wrk at N connections (gevent's loop then
runs several callbacks per batch: `balancer.evgil`). ``--pipeline N`` (keep-alive)
sends N requests in one ``sendall`` (pipelining: the worker parses them from one
read), then reads their N answers (REQUESTS, and 200, a multiple of N).
``--access-log PATH`` (``/dev/null``: no disk)
turns the worker's access log on, as ``log.access_log``: each request's record
is made and queued (`AccessLog.log`); with ``--sockets`` the log's writer formats
and writes them, counted with the rest, while without it the scripted client
empties the queue every 1,000 requests, as the writer would take a batch, so
that the figure is the request path's share alone.

Used for issue 2's speed work; `scripts/bench_proxy.py` is the end-to-end
benchmark (wrk, nginx, HAProxy).
"""

from __future__ import annotations

import sys

if "--sockets" in sys.argv:  # a real gevent worker: patched before anything imports socket
    from gevent import monkey

    monkey.patch_all()

import argparse
import gc
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from balancer.chunks import LAST_CHUNK  # noqa: E402
from balancer.connection import ClientConnection  # noqa: E402
from balancer.netio import IO  # noqa: E402
from balancer.pool import Upstream  # noqa: E402
from balancer.relay import frame_chunk  # noqa: E402
from balancer.server import Worker  # noqa: E402
from balancer.settings import load_settings  # noqa: E402
from loadtest.page import PAGE  # noqa: E402

REQUEST = b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:19000\r\n\r\n"
# Firefox's request for a page (`--browser`)
BROWSER_REQUEST = (
    b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:19000\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,"
    b"image/webp,*/*;q=0.8\r\nAccept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\nReferer: http://127.0.0.1:19000/\r\n"
    b"Connection: keep-alive\r\nCookie: session=8f2a9c41d7e3b605; theme=dark; "
    b"_ga=GA1.1.1234567890.1701800000\r\nUpgrade-Insecure-Requests: 1\r\n"
    b"Sec-Fetch-Dest: document\r\nSec-Fetch-Mode: navigate\r\n"
    b"Sec-Fetch-Site: same-origin\r\nSec-Fetch-User: ?1\r\nPriority: u=0, i\r\n"
    b"Cache-Control: max-age=0\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n"
            b"Date: Tue, 01 Dec 2026 09:00:00 GMT\r\nContent-Type: text/html\r\n"
            b"Content-Length: %d\r\nLast-Modified: Tue, 01 Dec 2026 08:00:00 GMT\r\n"
            b"Connection: keep-alive\r\nETag: \"692d5a40-1194\"\r\nAccept-Ranges: bytes\r\n\r\n"
            % len(PAGE)) + PAGE
PASSES = 5
_IDLE = socket.socketpair()  # one end stands for the pooled backend connection's fd
IDLE_FD = _IDLE[0].fileno()


class Client:
    """A client socket that sends `count` requests, one per read, then closes."""

    family = 2  # AF_INET: the handler sets TCP_NODELAY

    def __init__(self, count: int, log: Any = None) -> None:
        self.count = count
        self.received = 0
        self.log = log  # `--access-log`: the AccessLog, its queue emptied now and then

    def recv(self, size: int, flags: int = 0) -> bytes:
        if not self.count:
            return b""
        self.count -= 1
        if self.log is not None and not self.count % 1000:
            self.log._pending.clear()  # the writer's batch, taken (as `flush` does)
            self.log._held = 0
        return REQUEST

    def send(self, data: bytes) -> int:
        self.received += len(data)
        return len(data)

    def sendall(self, data: bytes) -> None:
        self.received += len(data)

    def settimeout(self, seconds: float | None) -> None:
        pass

    def gettimeout(self) -> float | None:
        return None

    def setsockopt(self, *args: object) -> None:
        pass

    def fileno(self) -> int:
        return IDLE_FD  # polled while pooled: nothing to read


class Backend(Client):
    """A pooled backend connection that answers every request at once."""

    def recv(self, size: int, flags: int = 0) -> bytes:
        if flags & socket.MSG_PEEK:
            raise BlockingIOError  # idle in the pool: nothing came (`balancer.peek`)
        return RESPONSE


class Store:
    display_url = "bench:"
    quiet = True

    def __init__(self, backend: str = "127.0.0.1:9", cert_host: str = "") -> None:
        self.backend = backend
        self.cert_host = cert_host or TLS_NAME  # the host its certificate is stored for

    def certs(self) -> SimpleNamespace:
        """The certificate of `--tls` (any name: it is the default host's)."""
        from balancer.certificates import make_record
        from tests.tlsca import TestCA

        chain, key = TestCA("bench CA").issue(TLS_NAME)
        records = {self.cert_host: make_record(TLS_NAME, chain, key)}
        return SimpleNamespace(all=lambda: records, signature=lambda: 1, damaged={})

    def load(self) -> SimpleNamespace:
        return SimpleNamespace(version=1, hosts={
            "*": {"action": "proxy", "backends": [self.backend]}})

    def identity(self) -> str:
        return "bench"

    def raise_floor(self, version: int) -> None:
        pass

    def close(self) -> None:
        pass


def setup(access_log: str = "") -> object:
    """A worker's listener context with the blocking `IO` (arm() sets scripted
    socket timeouts), its one backend pooled; its access log at `access_log`."""
    io = IO()
    flags = {"log.access_log": access_log} if access_log else {}
    worker = Worker(load_settings(flags=flags, env={"BALANCER_STORE_SNAPSHOT": "off"}), Store(),
                    io=io)
    if not worker.apply(worker.store.load()):
        raise SystemExit("the table did not compile")
    ctx = worker.context(False)
    backend = next(iter(worker.registry.backends.values()))
    upstream = Upstream(io.stream(Backend(0)))
    backend.release(upstream)
    upstream.since = float("inf")  # never expires
    return ctx


def run(requests: int, access_log: str = "") -> float:
    """Best µs per request over PASSES passes of `requests` each."""
    ctx = setup(access_log)
    gc.freeze()
    best = float("inf")
    queue = ctx.access_log if access_log else None
    for _ in range(PASSES):
        client = Client(requests, queue)
        conn = ClientConnection(client, ("127.0.0.1", 40000), ctx)
        start = time.perf_counter()
        conn.serve()
        best = min(best, time.perf_counter() - start)
        if client.received < requests * len(PAGE):
            raise SystemExit(f"only {client.received} bytes answered: the proxy path failed")
    return best / requests * 1e6


def instructions(extra: list[str], short: int, long: int, per: int) -> float:
    """Instructions per request under callgrind: two runs of `short` and `long`
    requests, the difference divided by the `per` extra requests it made."""
    counts = []
    # str hashes, and so dict probe sequences, change with each process's hash seed:
    # up to 3 % between two runs unless it is fixed (then within ~10 instructions)
    env = {**os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")}
    for requests in (short, long):
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
             os.path.realpath(sys.executable), __file__, "--requests", str(requests), *extra],
            capture_output=True, text=True, check=True, env=env).stderr
        counts.append(int(re.search(r"Collected : (\d+)", out).group(1)))
    return (counts[1] - counts[0]) / per


# --sockets: a real gevent worker, its backend and client in a helper process -------
CLOSE_REQUEST = REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
# `--body`: a JSON API client's POST head (its Content-Length filled in per size)
POST_HEAD = (b"POST /api/items HTTP/1.1\r\nHost: 127.0.0.1:19000\r\n"
             b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n")
LARGE_BODY = 1 << 20  # `--instructions` makes fewer requests with a body this large
PEER_TIMEOUT = 60.0  # seconds any helper socket waits (valgrind is ~50x slower)
TLS_NAME = "bench.test"  # `--tls`: the certificate's name, served as the default host's
# `--refuse-fronting`: the certificate stored as this host's (every request's Host), so
# that each request passes the check (`tls.refuse_domain_fronting`) and is proxied
FRONTED_HOST = "127.0.0.1"


def body_size(text: str) -> int:
    """`--body`'s SIZE: bytes, or with a K / M suffix (KiB, MiB); ValueError
    (argparse's usage error) if it is not a size."""
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:].upper(), 1)
    size = int(text[:-1] if scale > 1 else text) * scale
    if size < 0:
        raise ValueError(f"negative size {text!r}")
    return size


def post_request(size: int, close: bool, chunk: int = 0) -> bytes:
    """`--body`'s request: POST_HEAD and `size` bytes of JSON-ish body; with
    `chunk`, the body chunked in pieces of that many bytes (`--chunked`)."""
    head = POST_HEAD % size
    if close:
        head = head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    unit = b'{"id": 12345, "name": "item", "tags": ["a", "b"]},'
    body = (unit * (size // len(unit) + 1))[:size]
    if not chunk:
        return head + body
    head = head.replace(b"Content-Length: %d" % size, b"Transfer-Encoding: chunked")
    framed = [frame_chunk(body[at:at + chunk]) for at in range(0, size, chunk)]
    return head + b"".join(framed) + LAST_CHUNK


def run_sockets(mode: str, requests: int, vary: list[str], tls: bool = False,
                access_log: str = "", fronting: bool = False) -> float:
    """µs per request through a gevent worker on loopback (wall clock, this process);
    with `--body`, prints the worker's CPU µs per request too; `access_log`: its path."""
    from gevent import subprocess as gsubprocess

    from balancer.accepting import bind
    from balancer.addr import parse_addr

    peer = gsubprocess.Popen([sys.executable, __file__, "--peer", mode, str(requests), *vary,
                              *(["--tls"] if tls else [])],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    backend = int(peer.stdout.readline())
    cert_host = FRONTED_HOST if fronting else TLS_NAME
    flags: dict[str, object] = {"tls.default_host": cert_host} if tls else {}
    if fronting:
        flags["tls.refuse_domain_fronting"] = True
    if access_log:
        flags["log.access_log"] = access_log
    worker = Worker(load_settings(flags=flags, env={"BALANCER_STORE_SNAPSHOT": "off"}),
                    Store(f"127.0.0.1:{backend}", cert_host))
    if not worker.apply(worker.store.load()):
        raise SystemExit("the table did not compile")
    listener = bind(parse_addr("127.0.0.1:0"))
    worker.listen([(listener, "tls" if tls else False)])
    worker.access_log.start()  # its writer (nothing when off)
    gc.freeze()
    cpu = time.process_time()
    start = time.perf_counter()
    peer.stdin.write(b"%d\n" % listener.getsockname()[1])
    peer.stdin.flush()
    answered = int(peer.stdout.readline() or 0)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    peer.wait()
    if answered != requests:
        raise SystemExit(f"only {answered} of {requests} requests answered")
    if "--body" in vary:
        print(f"{cpu / requests * 1e6:.2f} µs of worker CPU per request (user + system)")
    return elapsed / requests * 1e6


def peer(mode: str, requests: int, vary: bool = False, browser: bool = False,
         tls: bool = False, body: int | None = None, chunk: int = 0,
         connections: int = 1, pipeline: int = 1) -> None:
    """The helper: a keep-alive backend, then a client making `requests` requests
    (stdout: the backend's port, then how many were answered whole); `vary`: each
    request's target differs; `browser`: a browser's head; `tls`: over TLS;
    `body`: POSTs with a body of that many bytes (`chunk`: chunked, chunks of that size);
    `connections`: keep-alive, one request in flight on each of that many connections;
    `pipeline`: keep-alive, that many requests sent at once (one `sendall`) on each."""
    backend = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_backend_loop, args=(backend,), daemon=True).start()
    print(backend.getsockname()[1], flush=True)
    port = int(sys.stdin.readline())
    answered = 0
    connect = _tls_connect if tls else _connect
    if mode == "close":
        request = CLOSE_REQUEST if body is None else post_request(body, True, chunk)
        for _ in range(requests):
            with connect(port) as conn:
                conn.sendall(request)
                answered += _read_to_eof(conn).endswith(PAGE)
    else:
        head = (BROWSER_REQUEST if browser else REQUEST) if body is None else (
            post_request(body, False, chunk))
        conns = [connect(port) for _ in range(connections)]
        for n in range(0, requests, connections * pipeline):
            for conn in conns:  # a request (or `pipeline`) on each, then every answer
                conn.sendall(b"".join(head.replace(b".html", b".html?%d" % (n + k)) if vary
                                      else head for k in range(pipeline)))
            answered += sum(_read_response(conn, pipeline) for conn in conns)
        for conn in conns:
            conn.close()
    print(answered, flush=True)


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=PEER_TIMEOUT)


def _tls_connect(port: int) -> socket.socket:
    """A TLS 1.3 connection (nothing verified: the bench's own certificate)."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context.wrap_socket(_connect(port))


def _backend_loop(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_answer_loop, args=(conn,), daemon=True).start()


def _answer_loop(conn: socket.socket) -> None:
    """Answer every request on `conn` with RESPONSE (keep-alive), once its head
    and its Content-Length or chunked body are read."""
    buffer = b""
    with conn:
        while True:
            while b"\r\n\r\n" not in buffer:
                data = conn.recv(65536)
                if not data:
                    return
                buffer += data
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            if b"\r\ntransfer-encoding: chunked" in head.lower():
                buffer = _read_chunked(conn, buffer)
                conn.sendall(RESPONSE)
                continue
            found = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
            left = int(found.group(1)) - len(buffer) if found else 0
            while left > 0:
                data = conn.recv(min(left, 1 << 20))
                if not data:
                    return
                left -= len(data)
            buffer = buffer[len(buffer) + left:] if left < 0 else b""
            conn.sendall(RESPONSE)


def _read_chunked(conn: socket.socket, buffer: bytes) -> bytes:
    """Read a chunked body (no trailers) that begins with `buffer`; returns what
    follows it. Raises ConnectionError if the connection closes first."""
    at = 0
    while True:
        while (end := buffer.find(b"\r\n", at)) < 0:
            buffer = buffer[at:] + _recv(conn)
            at = 0
        size = int(buffer[at:end].split(b";")[0], 16)
        at = end + 2 + size + 2  # the chunk's data and its CRLF (the last: the empty line)
        while len(buffer) < at:
            buffer += _recv(conn)
        if not size:
            return buffer[at:]


def _recv(conn: socket.socket) -> bytes:
    data = conn.recv(1 << 20)
    if not data:
        raise ConnectionError("the balancer closed during a chunked body")
    return data


def _read_to_eof(conn: socket.socket) -> bytes:
    pieces = []
    while data := conn.recv(65536):
        pieces.append(data)
    return b"".join(pieces)


def _read_response(conn: socket.socket, count: int = 1) -> int:
    """Read `count` responses whose body is the page; how many came whole."""
    data = b""
    while not data.endswith(PAGE) or data.count(PAGE) < count:
        more = conn.recv(65536)
        if not more:
            return data.count(PAGE)
        data += more
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000, help="requests per pass")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per request under callgrind")
    parser.add_argument("--sockets", choices=("close", "keep-alive"),
                        help="a real gevent worker on loopback; close: a new connection "
                             "per request")
    parser.add_argument("--vary", action="store_true",
                        help="with --sockets keep-alive: every request's target differs "
                             "(no head repeats)")
    parser.add_argument("--browser", action="store_true",
                        help="with --vary: a browser's head (14 fields beside Host)")
    parser.add_argument("--tls", action="store_true",
                        help="with --sockets: a TLS listener (a full handshake per request "
                             "with close)")
    parser.add_argument("--refuse-fronting", action="store_true",
                        help="with --tls: tls.refuse_domain_fronting on (each request's Host "
                             "checked against the connection's certificate, and proxied)")
    parser.add_argument("--body", metavar="SIZE", type=body_size,
                        help="with --sockets: POST requests with a Content-Length body of "
                             "SIZE bytes (K, M: KiB, MiB)")
    parser.add_argument("--chunked", metavar="CHUNK", type=body_size, nargs="?", const=16384,
                        default=0, help="with --body: send it chunked, in chunks of CHUNK "
                                        "bytes (16K unless given)")
    parser.add_argument("--connections", metavar="N", type=int, default=1,
                        help="with --sockets keep-alive: N connections, one request in "
                             "flight on each (REQUESTS a multiple of N)")
    parser.add_argument("--pipeline", metavar="N", type=int, default=1,
                        help="with --sockets keep-alive: N requests in one send, then their "
                             "answers (REQUESTS a multiple of N)")
    parser.add_argument("--access-log", metavar="PATH", default="",
                        help="the worker's access log (/dev/null: no disk)")
    parser.add_argument("--peer", nargs=2, metavar=("MODE", "REQUESTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    body = args.body
    varied = ((["--vary"] if args.vary else []) + (["--browser"] if args.browser else [])
              + ([] if body is None else ["--body", str(body)])
              + (["--chunked", str(args.chunked)] if args.chunked else [])
              + (["--connections", str(args.connections)] if args.connections > 1 else [])
              + (["--pipeline", str(args.pipeline)] if args.pipeline > 1 else []))
    kind = (", varied" * args.vary + ", browser" * args.browser + ", TLS" * args.tls
            + ", refusing fronting" * args.refuse_fronting
            + ("" if body is None else f", POST body of {body:,} bytes")
            + (f", chunked by {args.chunked:,}" if args.chunked else "")
            + (f", {args.connections} connections" if args.connections > 1 else "")
            + (f", pipelined by {args.pipeline}" if args.pipeline > 1 else ""))
    if args.chunked and body is None:
        parser.error("--chunked needs --body")
    if args.connections > 1 and not args.peer and (
            args.sockets != "keep-alive" or args.requests % args.connections
            or 200 % args.connections):
        parser.error("--connections needs --sockets keep-alive, and --requests (and 200, "
                     "what --instructions makes) a multiple of it")
    if args.pipeline > 1 and not args.peer and (
            args.sockets != "keep-alive" or args.requests % args.pipeline or 200 % args.pipeline):
        parser.error("--pipeline needs --sockets keep-alive, and --requests (and 200, "
                     "what --instructions makes) a multiple of it")
    logged = ["--access-log", args.access_log] if args.access_log else []
    kind += f", access log {args.access_log}" * bool(args.access_log)
    if args.peer:
        peer(args.peer[0], int(args.peer[1]), args.vary, args.browser, args.tls, body,
             args.chunked, args.connections, args.pipeline)
    elif args.sockets and args.instructions:
        short, long = (2, 12) if body is not None and body >= LARGE_BODY else (200, 1200)
        count = instructions(["--sockets", args.sockets, *varied, *["--tls"] * args.tls,
                              *["--refuse-fronting"] * args.refuse_fronting, *logged],
                             short, long, long - short)
        print(f"{count:,.0f} instructions per request ({args.sockets}{kind}, real sockets)")
    elif args.sockets:
        took = run_sockets(args.sockets, args.requests, varied, args.tls, args.access_log,
                           args.refuse_fronting)
        print(f"{took:.2f}"
              " µs per request "
              f"({args.sockets}{kind}, real sockets, wall clock)")
    elif args.instructions:
        print(f"{instructions(logged, 100, 1100, 1000 * PASSES):,.0f} instructions per request"
              f"{kind}")
    else:
        print(f"{run(args.requests, args.access_log):.2f} µs per request (best of {PASSES} "
              f"passes{kind})")


if __name__ == "__main__":
    main()
