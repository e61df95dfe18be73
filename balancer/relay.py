"""Relaying one request to one backend and its response back, streaming both ways.

Invariants:
* Bodies are never held whole: each piece is sent on as it is parsed.
* Hop-by-hop headers (and those named in Connection) are not forwarded.
  External listeners replace X-Forwarded-*/Forwarded; internal (trusted)
  listeners extend X-Forwarded-For and keep the others.
* Socket errors toward the backend become `BackendClosed`/`BackendTimeout`
  here; toward the client `ClientGone` (raised by `Exchange.send`).
* A backend connection goes back to its pool only at a message boundary of
  a complete, keep-alive response.
"""

from __future__ import annotations

import time
from typing import Final

from balancer.connection import Exchange
from balancer.errors import BackendClosed, BackendProtocolError, BackendTimeout, ClientGone
from balancer.http11 import END, HOP_BY_HOP, ProtocolError, RequestHead
from balancer.pool import Backend, Upstream
from balancer.readiness import receive
from balancer.response_parser import ResponseHead, ResponseParser
from balancer.tunnel import tunnel
from balancer.turns import Turn

RECV_SIZE: Final = 65536
COALESCE_LIMIT: Final = 65536
FORWARDED: Final = frozenset((b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                              b"forwarded", b"x-request-id"))
DROP_EXTERNAL: Final = HOP_BY_HOP | FORWARDED | {b"host", b"expect"}
DROP_INTERNAL: Final = HOP_BY_HOP | {b"host", b"expect", b"x-request-id", b"x-forwarded-for"}
RAW: Final = 0  # how the response body is framed toward the client
CHUNK: Final = 1
CLOSE: Final = 2
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


def request_head(ex: Exchange, chunked: bool) -> bytes:
    """The request head sent to the backend (always HTTP/1.1, keep-alive)."""
    head, conn = ex.head, ex.conn
    tokens = head.connection_tokens
    lines = [head.method, b" ", head.target, b" HTTP/1.1\r\nHost: ", head.host, b"\r\n"]
    if conn.ctx.trusted:
        _trusted_fields(lines, head, tokens, conn.client_ip_bytes)
    else:
        drop = DROP_EXTERNAL | tokens if tokens else DROP_EXTERNAL
        for name, lname, value in head.headers:
            if lname not in drop:
                lines += (name, b": ", value, b"\r\n")
        lines += (b"X-Forwarded-For: ", conn.client_ip_bytes,
                  b"\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: ", head.host, b"\r\n")
    lines += (b"X-Request-Id: ", ex.request_id, b"\r\n")
    if head.upgrade:
        lines.append(b"Connection: upgrade\r\nUpgrade: %s\r\n" % head.upgrade)
    if chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def _trusted_fields(lines: list[bytes], head: RequestHead, tokens: frozenset[bytes],
                    client_ip: bytes) -> None:
    """The fields of a request from a trusted listener: X-Forwarded-For extended,
    the other X-Forwarded-* kept (or added)."""
    drop = DROP_INTERNAL | tokens if tokens else DROP_INTERNAL
    forwarded_for, seen = [], set()
    for name, lname, value in head.headers:
        if lname in drop:
            if lname == b"x-forwarded-for":
                forwarded_for.append(value)
            continue
        if lname in FORWARDED:
            seen.add(lname)
        lines += (name, b": ", value, b"\r\n")
    forwarded_for.append(client_ip)
    lines += (b"X-Forwarded-For: ", b", ".join(forwarded_for), b"\r\n")
    if b"x-forwarded-proto" not in seen:
        lines.append(b"X-Forwarded-Proto: http\r\n")
    if b"x-forwarded-host" not in seen:
        lines += (b"X-Forwarded-Host: ", head.host, b"\r\n")


def frame_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def send_request(ex: Exchange, upstream: Upstream, body: bytes | None,
                 max_body: int | None) -> bool:
    """Send the request; `body` is the whole body when in hand, else it is streamed
    (returns True then)."""
    head = ex.head
    chunked = head.chunked
    data = request_head(ex, chunked)
    if body is not None:
        if chunked:
            data += (frame_chunk(body) if body else b"") + b"0\r\n\r\n"
        else:
            data += body
    whole = body is not None or ex.body_done
    _send_backend(upstream, data, whole)
    if whole:
        return False
    if head.expect_continue and head.version == b"1.1":
        try:
            ex.conn.writer.write(CONTINUE)
        except OSError as exc:
            raise ClientGone(str(exc)) from None
    _stream_body(ex, upstream, chunked, max_body)
    return True


def _stream_body(ex: Exchange, upstream: Upstream, chunked: bool,
                 max_body: int | None) -> None:
    from balancer.errors import PayloadTooLarge

    for chunk in ex.body_chunks():
        if max_body is not None and ex.received > max_body:
            raise PayloadTooLarge("request body over max_body_bytes")
        _send_backend(upstream, frame_chunk(chunk) if chunked else chunk)
    if chunked:
        _send_backend(upstream, b"0\r\n\r\n")


def _send_backend(upstream: Upstream, data: bytes, last: bool = False) -> None:
    """Send request bytes; `last`: the request is whole and the response is
    awaited next, so they may be held (`balancer.outbox`)."""
    try:
        if last:
            upstream.writer.write_last(data)
        else:
            upstream.writer.write(data)
    except TimeoutError:
        raise BackendTimeout("backend did not accept the request in time") from None
    except OSError as exc:
        raise BackendClosed(str(exc)) from None


def _recv_backend(upstream: Upstream, parser: ResponseParser) -> None:
    """Read once from the backend into `parser`; maps every failure."""
    try:
        data = receive(upstream.raw, upstream.watcher, RECV_SIZE)
    except TimeoutError:
        raise BackendTimeout("backend read timeout") from None
    except OSError as exc:
        raise BackendClosed(str(exc)) from None
    try:
        if data:
            parser.feed(data)
        else:
            parser.feed_eof()
    except ProtocolError as exc:
        if data:
            raise BackendProtocolError(exc.reason) from None
        raise BackendClosed(exc.reason) from None


def read_response_head(ex: Exchange, upstream: Upstream) -> ResponseHead:
    """The final (or 101) response head; 1xx interim responses are skipped.

    Under gevent (a watcher), waits for the answer before the first read."""
    parser = upstream.parser
    for_head = ex.head.method == b"HEAD"
    if parser is None:
        parser = upstream.parser = ResponseParser(ex.conn.ctx.limits, for_head)
    else:
        parser.begin(for_head)
    events = parser.events
    if upstream.watcher is not None:
        try:
            upstream.watcher.wait()
        except TimeoutError:
            raise BackendTimeout("backend read timeout") from None
    while True:
        while not events:
            _recv_backend(upstream, parser)
        rhead = events.popleft()
        if rhead.status >= 200 or rhead.status == 101:
            return rhead
        while True:  # drop an interim response (we answer 100 Continue ourselves)
            while not events:
                _recv_backend(upstream, parser)
            if events.popleft() is END:
                break


def response_head(ex: Exchange, rhead: ResponseHead) -> tuple[bytes, int]:
    """The response head for the client and how its body is framed."""
    head = ex.head
    lines = [rhead.status_line, rhead.forwarded, b"\r\nX-Request-Id: ", ex.request_id]
    if rhead.status == 101:
        lines.append(b"\r\nConnection: upgrade\r\nUpgrade: %s\r\n\r\n" % head.upgrade)
        return b"".join(lines), RAW
    framing = RAW
    if not rhead.no_body and rhead.content_length is None:
        if head.version == b"1.1":
            framing = CHUNK
            lines.append(b"\r\nTransfer-Encoding: chunked")
        else:
            framing = CLOSE
            ex.keep_alive = False
    if not ex.keep_alive:
        lines.append(b"\r\nConnection: close\r\n\r\n")
    elif head.version == b"1.0":
        lines.append(b"\r\nConnection: keep-alive\r\n\r\n")
    else:
        lines.append(b"\r\n\r\n")
    return b"".join(lines), framing


def relay_response(ex: Exchange, upstream: Upstream, rhead: ResponseHead) -> bool:
    """Send the response to the client; returns whether `upstream` can be pooled."""
    ex.status = rhead.status
    data, framing = response_head(ex, rhead)
    sock, parser = upstream.sock, upstream.parser
    assert parser is not None  # read_response_head made it
    events = parser.events
    if parser.complete and framing == RAW:  # all of it came with the head: one send
        events.pop()  # END
        events.appendleft(data)
        ex.send(b"".join(events), last=True)
        events.clear()
        return rhead.keep_alive and not parser.upgraded
    out = [data]
    conn, timeouts = ex.conn, ex.conn.ctx.timeouts
    # A small fixed-length response is sent in one piece even when the backend
    # wrote it in several (nginx: head by writev, body by sendfile).
    hold = rhead.content_length is not None and rhead.content_length <= COALESCE_LIMIT
    watcher = upstream.watcher
    turn = Turn(None if watcher is None else watcher.hub)
    while True:
        while events:
            event = events.popleft()
            if event is END:
                if framing == CHUNK:
                    out.append(b"0\r\n\r\n")
                ex.send(b"".join(out), last=True)
                return rhead.keep_alive and not parser.upgraded
            out.append(frame_chunk(event) if framing == CHUNK else event)
        if not hold:
            conn.arm(conn.sock, timeouts.client_idle)
            data = b"".join(out)
            ex.send(data)
            out = []
            turn.spend(len(data))
        conn.arm(sock, timeouts.backend_read)
        _recv_backend(upstream, parser)


def forward(ex: Exchange, backend: Backend, body: bytes | None, max_body: int | None) -> None:
    """Do the whole exchange with `backend`; raises the ProxyError family on failure.

    A pooled connection that turns out closed before the response began is
    replaced by a fresh one, transparently, when the request can be replayed.
    """
    upstream, reused = backend.acquire()
    if reused and body is None and not ex.body_done and not backend.is_open(upstream.sock):
        upstream.close()
        upstream, reused = backend.connect(), False
    backend.in_flight += 1
    started = time.perf_counter()
    try:
        try:
            rhead = exchange(ex, upstream, body, max_body)
        except BackendClosed:
            upstream.close()
            if not reused or (body is None and ex.head.has_body):
                raise  # a fresh connection failed, or the streamed body is gone
            upstream = backend.connect()
            rhead = exchange(ex, upstream, body, max_body)
        ex.backend_time = time.perf_counter() - started
        if rhead.status == 101:
            if not ex.head.upgrade:
                raise BackendProtocolError("101 Switching Protocols to a request without Upgrade")
            _upgrade(ex, upstream, rhead)
            upstream.close()
            return
        reusable = relay_response(ex, upstream, rhead) and not ex.head.upgrade
    except BaseException:
        upstream.close()
        raise
    finally:
        backend.in_flight -= 1
    if reusable:
        backend.release(upstream)
    else:
        upstream.close()


def exchange(ex: Exchange, upstream: Upstream, body: bytes | None,
             max_body: int | None) -> ResponseHead:
    """Send the request on `upstream` and read the response head."""
    conn, sock = ex.conn, upstream.sock
    timeout = conn.ctx.timeouts.backend_read
    conn.arm(sock, timeout)
    streamed = send_request(ex, upstream, body, max_body)
    if streamed:  # reading the client's body armed the client's timeout
        conn.arm(sock, timeout)
    return read_response_head(ex, upstream)


def _upgrade(ex: Exchange, upstream: Upstream, rhead: ResponseHead) -> None:
    """Switch to a two-way tunnel after the backend accepted the upgrade."""
    ex.status = 101
    data, _ = response_head(ex, rhead)
    parser = upstream.parser
    assert parser is not None  # read_response_head made it
    ex.send(data + parser.leftover)
    try:
        upstream.writer.finish()  # the request went out before its answer came
    except OSError as exc:
        raise BackendClosed(str(exc)) from None
    conn = ex.conn
    client_leftover = conn.parser.leftover
    ex.keep_alive = False
    ex.body_done = True
    conn.disarm()
    sent, received = tunnel(conn.sock, upstream.sock, client_leftover,
                            conn.ctx.timeouts.tunnel_idle)
    ex.sent += sent
    ex.received += received
