"""Request heads whose forwarded bytes are compared with what the balancer sent
before request heads were kept as raw field blocks (tests/test_raw_request_fields.py;
tests/data/forwarded_heads.json was made by `main(OUT)` with the per-field
parser's code, main 8448700, first on the path). To make it again (a case added)::

    mkdir /tmp/old && git archive 8448700 balancer | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python3 tests/forward_cases.py tests/data/forwarded_heads.json

Where the forwarding policy itself changes, the file is made with the new code
instead (``PYTHONPATH=.``) and the difference reviewed: it is then a record of
what the backend gets, no longer a comparison with the per-field parser."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

G = b"GET /p?q=1 HTTP/1.1\r\n"
P = b"POST /up HTTP/1.1\r\n"
BROWSER = (b"Host: app.test\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0)\r\n"
           b"Accept: text/html,application/xhtml+xml;q=0.9,*/*;q=0.8\r\n"
           b"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\n"
           b"Referer: https://app.test/start\r\nConnection: keep-alive\r\n"
           b"Cookie: session=abc123; theme=dark; _ga=GA1.2.3.4\r\n"
           b"Upgrade-Insecure-Requests: 1\r\nSec-Fetch-Dest: document\r\n"
           b"Sec-Fetch-Mode: navigate\r\nSec-Fetch-Site: same-origin\r\n"
           b"Sec-Fetch-User: ?1\r\nPriority: u=0, i\r\nCache-Control: max-age=0\r\n")

CASES: dict[str, bytes] = {
    "host only": G + b"Host: app.test\r\n\r\n",
    "browser": G + BROWSER + b"\r\n",
    "case kept": G + b"hOsT: app.test\r\nx-LOWER: a\r\nX-UPPER: B\r\n"
                     b"CoNNecTion: Keep-Alive\r\n\r\n",
    "repeated fields": G + b"Host: app.test\r\nX-A: 1\r\nAccept: a\r\nX-A: 2\r\nAccept: b\r\n"
                           b"Cookie: c=1\r\nCookie: d=2\r\n\r\n",
    "empty values": G + b"Host: app.test\r\nX-Blank: \r\nX-After: v\r\nX-Blank2: \r\n\r\n",
    "like special": G + b"Host: app.test\r\nX-Host: x\r\nHostname: h\r\nHosts: hs\r\n"
                        b"Content-Lengths: 9\r\nX-Content-Length: 7\r\nConnections: c\r\n"
                        b"Transfer-Encodings: gzip\r\nExpect-CT: e\r\nUpgrades: u\r\n"
                        b"X-Upgrade: u\r\nProxy-Connections: p\r\nTEs: t\r\nTE-X: t\r\n"
                        b"X-Forwarded-Fors: f\r\nX-Real-IPs: r\r\nX-Request-Ids: i\r\n"
                        b"Keep-Alives: k\r\nTrailers: t\r\nXForwarded-For: z\r\n\r\n",
    "connection names": G + b"Host: app.test\r\nConnection: close, X-Foo, x-bar\r\n"
                            b"X-Foo: 1\r\nX-Bar: 2\r\nX-Baz: 3\r\n\r\n",
    "connection names content-length": P + b"Host: app.test\r\nConnection: Content-Length\r\n"
                                           b"Content-Length: 3\r\n\r\nabc",
    "connection names a client field": G + b"Host: app.test\r\nConnection: X-Real-IP, X-A\r\n"
                                           b"X-Real-IP: 10.0.0.9\r\nX-A: a\r\n\r\n",
    "hop by hop": G + b"Host: app.test\r\nKeep-Alive: timeout=5\r\nTrailer: X-Sum\r\n"
                      b"Proxy-Authorization: Basic x\r\nProxy-Authenticate: y\r\n"
                      b"HTTP2-Settings: AAA\r\nProxy-Connection: keep-alive\r\nX-Kept: k\r\n\r\n",
    "client fields": G + b"Host: app.test\r\nX-Forwarded-For: 10.0.0.1, 10.0.0.2\r\n"
                         b"X-Real-IP: 10.0.0.2\r\nX-Forwarded-Proto: https\r\n"
                         b"X-Forwarded-Host: front.test\r\nForwarded: for=1.2.3.4\r\n"
                         b"X_Forwarded_For: 6.6.6.6\r\nx-forwarded_for: 7.7.7.7\r\n"
                         b"True-Client-IP: 8.8.8.8\r\nCF-Connecting-IP: 9.9.9.9\r\n"
                         b"X-Original-URL: /admin\r\nX-Keep: 1\r\n\r\n",
    "two x-forwarded-for": G + b"Host: app.test\r\nX-Forwarded-For: 1.1.1.1\r\nX-A: a\r\n"
                               b"X-Forwarded-For: 2.2.2.2\r\n\r\n",
    "request id": G + b"Host: app.test\r\nX-Request-Id: abc-123\r\nX_Request_Id: u\r\n\r\n",
    "empty request id": G + b"Host: app.test\r\nX-Request-Id:\r\nX-Request-Id: second\r\n\r\n",
    "te trailers": G + b"Host: app.test\r\nTE: trailers\r\nConnection: TE\r\n\r\n",
    "te gzip": G + b"Host: app.test\r\nTE: gzip\r\n\r\n",
    "expect": P + b"Host: app.test\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
    "content length": P + b"Host: app.test\r\nContent-Type: text/plain\r\n"
                          b"Content-Length: 5\r\n\r\nhello",
    "upgrade": G + b"Host: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   b"Sec-WebSocket-Version: 13\r\n\r\n",
    "upgrade h2c": G + b"Host: app.test\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                       b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    "upgrade h2c and ws": G + b"Host: app.test\r\nConnection: upgrade\r\n"
                              b"Upgrade: h2c, websocket\r\n\r\n",
    "http/1.0 no host": b"GET /old HTTP/1.0\r\nUser-Agent: old\r\n\r\n",
    "http/1.0 host": b"GET /old HTTP/1.0\r\nHost: app.test\r\nConnection: keep-alive\r\n\r\n",
    "absolute form": b"GET http://app.test:8080/abs?x=1 HTTP/1.1\r\nHost: other.test\r\n\r\n",
    "options star": b"OPTIONS * HTTP/1.1\r\nHost: app.test\r\n\r\n",
    "host trailing blanks": G + b"Host: app.test \t\r\nX-A: a\r\n\r\n",
    "host with port": G + b"Host: [::1]:8080\r\n\r\n",
    "empty lines before": b"\r\n\r\n" + G + b"Host: app.test\r\n\r\n",
    "no fields but host last": G + b"X-A: a\r\nX-B: b\r\nHost: app.test\r\n\r\n",
    "many fields": G + b"Host: app.test\r\n" + b"".join(b"X-F%d: v%d\r\n" % (i, i)
                                                       for i in range(99)) + b"\r\n",
    "max size head": G + b"Host: app.test\r\nX-Pad: " + b"p" * (65536 - 48) + b"\r\n\r\n",
    "chunked": P + b"Host: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nX-Real-IP: 1.2.3.4\r\nHost: t\r\n\r\n",
    "chunked te case": P + b"Host: app.test\r\nTransfer-Encoding: Chunked\r\n"
                           b"TE: trailers\r\n\r\n0\r\n\r\n",
    "pipelined": G + b"Host: app.test\r\nX-A: 1\r\n\r\n" + G + b"Host: app.test\r\nX-A: 2\r\n\r\n",
    "pipelined after a body": P + b"Host: app.test\r\nContent-Length: 3\r\n\r\nabc"
                              + G + b"Host: app.test\r\nX-B: 2\r\n\r\n",
    "pipelined after chunked": P + b"Host: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
                               + G + b"Host: app.test\r\nX-C: 3\r\n\r\n"
                               + G + b"Host: app.test\r\nX-D: 4\r\n\r\n",
    "chunked with crlfs in data": P + b"Host: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"8\r\n\r\n\r\n\r\n\r\n\r\n0\r\n\r\n"
                                  + G + b"Host: app.test\r\n\r\n",
    # one Content-Length sent twice: merged (as HAProxy), forwarded once
    "equal content lengths": P + b"Host: app.test\r\nContent-Length: 1\r\n"
                                 b"Content-Length: 1\r\n\r\na",
    # refused
    "two hosts": G + b"Host: app.test\r\nHost: app.test\r\n\r\n",
    "two content lengths": P + b"Host: app.test\r\nContent-Length: 1\r\n"
                               b"Content-Length: 2\r\n\r\nab",
    "cl and te": P + b"Host: app.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    "te twice": P + b"Host: app.test\r\nTransfer-Encoding: chunked\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te gzip chunked": P + b"Host: app.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    "obs fold": G + b"Host: app.test\r\nX-A: a\r\n  folded\r\n\r\n",
    "no host": G + b"X-A: a\r\n\r\n",
    "empty host": G + b"Host:\r\n\r\n",
    "bad host": G + b"Host: a b\r\n\r\n",
    "too many fields": G + b"Host: app.test\r\n" + b"".join(b"X-F%d: v\r\n" % i
                                                           for i in range(100)) + b"\r\n",
    "head too large": G + b"Host: app.test\r\nX-Pad: " + b"p" * (65536 - 47) + b"\r\n\r\n",
    "bad expect": P + b"Host: app.test\r\nExpect: nothing\r\nContent-Length: 0\r\n\r\n",
    "upgrade with body": P + b"Host: app.test\r\nConnection: upgrade\r\nUpgrade: ws\r\n"
                             b"Content-Length: 2\r\n\r\nab",
    "empty upgrade": G + b"Host: app.test\r\nConnection: upgrade\r\nUpgrade: a\r\nUpgrade:\r\n\r\n",
    "http/1.0 chunked": b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bare lf": G + b"Host: app.test\nX-A: a\r\n\r\n",
    "space before colon": G + b"Host : app.test\r\n\r\n",
    "fragment": b"GET /a#b HTTP/1.1\r\nHost: app.test\r\n\r\n",
    "connect": b"CONNECT app.test:443 HTTP/1.1\r\nHost: app.test:443\r\n\r\n",
    "http/2.0": b"GET / HTTP/2.0\r\nHost: app.test\r\n\r\n",
    "long line": b"GET /" + b"a" * 8200 + b" HTTP/1.1\r\nHost: app.test\r\n\r\n",
}

# Values with blanks around them (tabs, spaces): the backend gets the client's
# bytes now, where it got "Name: " and the value llhttp gave (no leading blanks).
BLANKS: dict[str, bytes] = {
    "tabs": G + b"Host:\tapp.test\r\nX-Tab:\tv\r\nX-Trail: v \t\r\nX-Both: \t v\t \r\n"
                b"X-None:x\r\n\r\n",
    "empty value without a blank": G + b"Host: app.test\r\nX-Empty:\r\nX-After: v\r\n\r\n",
}


class _Store:
    """A file-store-shaped table: every host proxied to one backend."""

    display_url = "test:"
    quiet = True

    def load(self) -> SimpleNamespace:
        return SimpleNamespace(version=1, hosts={
            "*": {"action": "proxy", "backends": ["10.1.1.1:80"]}})

    def identity(self) -> str:
        return "test"

    def raise_floor(self, version: int) -> None:
        pass

    def close(self) -> None:
        pass


_WORKERS: list = []


def _worker():
    """One worker for every call (the blocking IO: no gevent)."""
    if not _WORKERS:
        from balancer.netio import IO
        from balancer.server import Worker
        from balancer.settings import load_settings

        worker = Worker(load_settings(flags={}, env={"BALANCER_STORE_SNAPSHOT": "off"}),
                        _Store(), io=IO())
        assert worker.apply(worker.store.load())
        _WORKERS.append(worker)
    return _WORKERS[0]


def forwarded(data: bytes | list[bytes], trusted: bool) -> list:
    """What a backend gets for `data` fed whole (or in the pieces of a list): per
    request, its head (and the end of a chunked body: `last_chunk`), as latin-1
    text; body pieces (a chunked body's, forwarded as its framing, read strictly
    and given whole: `tests.support.unchunk`); END; or the refusal's status. Real
    objects (a worker's connection and exchanges), so that it runs compiled too."""
    import socket

    from balancer.connection import ClientConnection, Exchange
    from balancer.forwarding import last_chunk, request_head
    from balancer.http11 import END, ProtocolError, RequestHead
    from balancer.spans import span_bytes
    from tests.support import unchunk

    worker = _worker()
    left, right = socket.socketpair()
    with left, right:
        conn = ClientConnection(left, ("192.0.2.7", 1),
                                worker.context("internal" if trusted else "proxy"))
        parser = conn.parser
        out: list = []
        try:
            for piece in data if isinstance(data, list) else [data]:
                parser.feed(piece)
        except ProtocolError as exc:
            out.append(exc.status)
        chunked: RequestHead | None = None
        framed = b""
        for event in parser.events:
            if chunked is not None and (event is END or isinstance(event, (bytes, tuple))):
                if event is not END:
                    framed += span_bytes(event)
                    continue
                body = unchunk(framed + (last_chunk(chunked) if chunked.trailers else b""))
                out += [body.decode("latin-1")] if body else []
                chunked, framed = None, b""
            if isinstance(event, RequestHead):
                chunked = event if event.chunked else None
                route = worker.context("proxy").holder.table.lookup(event.host or b"x")
                ex = Exchange(conn, event, route, b"RID", 0.0)
                ex.backend = "10.1.1.1:80"
                text = request_head(ex, event.chunked)
                if trusted:  # the request id a trusted client's X-Request-Id gives
                    rid = conn.trusted_id(event)
                    sent = [v for _, lname, v in event.headers if lname == b"x-request-id"]
                    text += b"|" + (rid if rid in sent else b"RID")
                if event.chunked:
                    text += b"|" + last_chunk(event)
                out.append(text.decode("latin-1"))
            elif event is END:
                out.append("END")
            else:
                out.append(span_bytes(event).decode("latin-1"))  # bytes or a span
        parser.close()
    return out


def main(path: str) -> None:
    golden = {name: {"external": forwarded(data, False), "trusted": forwarded(data, True)}
              for name, data in {**CASES, **BLANKS}.items()}
    with open(path, "w") as out:
        json.dump(golden, out, indent=1, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1])
