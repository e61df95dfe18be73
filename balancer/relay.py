"""Relaying one request to one backend and its response back, streaming both ways.

Invariants:
* Bodies are never held whole: each piece is sent on as it is parsed.
* The request head is rewritten in `balancer.forwarding`; response heads
  lose their hop-by-hop fields (and those named in Connection) in
  `balancer.response_parser`.
* A chunked response's trailer fields reach HTTP/1.1 clients (whose response
  stays chunked) with its `Trailer` field; an HTTP/1.0 client's response is
  close-delimited, so they are dropped there (docs/headers.md).
* Interim (1xx) responses reach HTTP/1.1 clients as they come, at most
  `MAX_INTERIM` per request (a backend sending them without end is a bad
  response: 502); the response head, and what came of a body, go out before
  the relay waits for more.
* Socket errors toward the backend become `BackendClosed`/`BackendTimeout`
  here; toward the client `ClientGone` (raised by `Exchange.send`).
* A backend connection goes back to its pool only at a message boundary of
  a complete, keep-alive response, and not after a refusal of a request with
  a body (`REFUSAL`: the body may lie unread).
* A try on a connection taken from the pool (`Flight.reused`) that finds it
  closed before the answer began, or whose answer is a 408 (`STALE`), goes
  again once, on a new connection to the same backend, when the request can
  be replayed (`can_replay`; after a close, only an `IDEMPOTENT` one: the
  backend may have processed it); on a new connection either is the try's
  outcome. Every pooled connection is peeked at as it is taken
  (`balancer.pool.Backend.acquire_idle`), so that a close, or bytes, that came
  since the loop last polled it cost a new connection, not the client's 502
  (a POST's) or a stray response as its answer (a GET's).
* Each send of a streamed request body to the backend is bounded by
  `backend_read`, each read of it from the client by `client_idle`.
* One try on one backend is a `Flight`: `arrive` takes it from start to its
  answer; the hub (`balancer.inline`) may take it as far as its answer's
  relay with these same steps (a new connection's `Backend.start_connect`
  and `end_connect`, `dispatch`, `take_ready`, `deliver`), and a greenlet
  goes on from wherever it stopped (`arrive`): a connect still in progress
  (`Flight.connecting`) or failed, or a read that failed (`Flight.error`,
  raised once where the greenlet's own step would raise). A try that answered
  is landed by `ProxyAction.landed` on both paths (`land` within it), which
  releases what the try holds (its backend's `in_flight`, the rule's counts,
  the connection: pooled or closed) once, whatever raises there.
* A new backend connection for a request (both paths, and a pooled one's
  replacement) is begun with the client connection's deadline armed to the
  connect's own bound (`arm_connect`), never the one left from waiting for
  the request; a pooled connection costs no arming.
"""

from __future__ import annotations

from collections.abc import Callable
from ssl import SSLWantWriteError
from typing import Any, Final

from balancer.backend_tls import pool_key, read_failure
from balancer.connection import ClientConnection, Exchange
from balancer.errors import (
    BackendAnswered,
    BackendClosed,
    BackendProtocolError,
    BackendTimeout,
    ClientGone,
    ProxyError,
)
from balancer.forwarding import last_chunk, request_head
from balancer.http11 import END, LAST_CHUNK, ProtocolError, declared_body
from balancer.netio import CLOCK, Connecting
from balancer.pool import Backend, Upstream
from balancer.response_parser import ResponseHead, ResponseParser, final_head
from balancer.spans import Piece, Span, piece_size, span_bytes, span_joined, span_size
from balancer.stats import BackendStats
from balancer.tunnel import tunnel

RECV_SIZE: Final = 65536
COALESCE_LIMIT: Final = 65536
RAW: Final = 0  # how the response body is framed toward the client
CHUNK: Final = 1
CLOSE: Final = 2
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
EARLY_LIMIT: Final = 65536  # body bytes of an early success read while the request's go
# Interim (1xx) responses one request may get: a 100 Continue and a few 103 Early Hints
# are what servers send. Bug: a backend sending 1xx heads without end kept the request
# (each head a read within backend_read), its client and a worker busy forever.
MAX_INTERIM: Final = 32
# A body piece this large goes out beside the head instead of being joined to it:
# below, the join (a small pymalloc copy) costs less than a second buffer.
TAIL_MIN: Final = 512
REQUEST_ID: Final = b"\r\nX-Request-Id: "  # (the response head's pieces, `head_pieces`)
CHUNKED: Final = b"\r\nTransfer-Encoding: chunked"
# Bug: a backend that times out an idle keep-alive connection may send a 408 on it
# before it closes (Node.js, some Apache and Tomcat set-ups, Go servers), and a
# pooled connection reused at that moment got the 408 as the answer to the new
# request, which reached the client. A 408 means the server did not receive a
# complete request (RFC 9110 §15.5.9: not processed), so the answer of a
# connection taken from the pool that is a 408 is dropped with its connection
# and the request replayed once on a fresh one, as a pooled connection found
# closed is (`arrive`); Chromium retries a 408 on a reused socket once, HAProxy
# has `retry-on 408`. A 408 on a new connection is the backend's answer.
STALE: Final = "a 408 on a connection taken from the pool"
# The least status of an answer after which a request's body may lie unread: its
# connection goes back to no pool. A backend that refuses a body at its head (413,
# 401, 415...) and will not read it must close the connection (RFC 9112 §9.6);
# some do with a reset a moment after their answer, which lost the next request
# sent on it from the pool (a POST: a 502) until 2026-12-07. nginx keeps no
# connection whose answer ended before the body was all sent (its
# `request_body_sent`), but a body the socket took at once was "sent" before the
# answer came, read or not: so any refusal of a request with a body counts here
# (`_judge_answer` judges one that comes while the body goes the same way).
REFUSAL: Final = 400
# Methods whose request may reach a backend twice (RFC 9110 §9.2.2). Bug: a request
# sent on a pooled connection that the backend closed without an answer was
# replayed on a fresh one whatever its method, so a POST the backend had read
# (and perhaps processed, before it crashed or closed the connection after its
# Nth request) reached it twice; nginx and HAProxy send such a POST once (a 502).
IDEMPOTENT: Final = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))


def frame_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def send_request(ex: Exchange, upstream: Upstream, body: Piece | None,
                 max_body: int | None) -> bool:
    """Send the request; `body` is the whole body when in hand (bytes or a span),
    else it is streamed (returns True then). A body of `TAIL_MIN` bytes or more
    goes beside the head, not joined to it (one sendmsg of both). A chunked body's
    pieces are its framing (`balancer.chunks`), sent as they are."""
    head = ex.head
    chunked = head.chunked
    data = request_head(ex, chunked)
    if body is not None:
        if head.trailers:  # (chunked) its pieces end before its last chunk
            data += span_bytes(body) + last_chunk(head)
        elif piece_size(body) >= TAIL_MIN:
            _send_backend_span(upstream, data, body if isinstance(body, tuple) else (body, 0))
            return False
        else:
            data = span_joined(data, body) if isinstance(body, tuple) else data + body
    whole = body is not None or ex.body_done
    _send_backend(upstream, data, whole)
    if whole:
        return False
    if head.expect_continue and head.version == b"1.1":
        try:
            ex.conn.stream.write(CONTINUE)
        except OSError as exc:
            raise ClientGone(str(exc)) from None
    _stream_body(ex, upstream, chunked, max_body)
    return True


def _stream_body(ex: Exchange, upstream: Upstream, chunked: bool,
                 max_body: int | None) -> None:
    """Send the body as it comes, until it ends or the backend answers first
    with a complete response, an error (401, 413...) or an answer that closes,
    after which it may close or stop reading (RFC 9112 §9.3: a client watches
    for one while it sends and stops sending; nginx and HAProxy send such an
    answer on). The rest of the body is then neither read nor sent, and the
    client's connection closes after that answer. An early success still
    coming (its head, part of its body) is read on while the body goes, up to
    `EARLY_LIMIT` bytes; past them nothing more of it is read until the body
    went (the backend then reads the whole body before it answers in full).

    Each piece's send is bounded by `timeouts.backend_read` (as nginx's
    `proxy_send_timeout`, 60 s: a backend that stops reading gets a 504), each
    read of the client's by `client_idle`.

    An upload that never waits yields its turn like a response
    (`balancer.turns`): the loop runs between turns, which is when an answer is
    seen (a TLS connection whose send failed cannot be read any more). The
    threaded baseline's blocking streams cannot watch: there only an answer
    found when a send fails counts."""
    from balancer.errors import PayloadTooLarge

    stream, conn, sock = upstream.stream, ex.conn, upstream.sock
    judge = _judge_answer(upstream)
    stream.watch(judge)
    turn = conn.io.turn()
    backend_read = conn.ctx.backend_read
    try:
        for chunk in ex.body_chunks():  # (each read from the client arms client_idle)
            if max_body is not None and declared_body(ex.head) > max_body:  # (chunked)
                raise PayloadTooLarge("chunk sizes over max_body_bytes")
            conn.arm(sock, backend_read)  # a backend that takes none of it for that long: 504
            _look(upstream, judge)
            _send_body(upstream, chunk)
            turn.spend(piece_size(chunk))
        if chunked and ex.head.trailers:  # (its pieces end before its last chunk)
            conn.arm(sock, backend_read)
            _look(upstream, judge)
            _send_body(upstream, last_chunk(ex.head))
        _end_body(upstream)
        return
    except BackendAnswered:
        if not ex.body_done:  # the rest of the body is still coming
            ex.keep_alive = False
    finally:
        stream.unwatch()


def _look(upstream: Upstream, judge: Callable[[], BaseException | bool]) -> None:
    """Before a piece of the body goes: `judge` what the backend sent, which the
    loop may not have seen (pieces sent in one loop iteration), with one read
    that does not wait, until a final head came (raises what it finds)."""
    parser = upstream.parser
    assert parser is not None  # `exchange` began it
    if final_head(parser) is None:
        came = judge()
        if isinstance(came, BaseException):
            raise came


def _end_body(upstream: Upstream) -> None:
    """The body went whole: an answer whose head came before its last piece
    went (`_look`, or the loop's `judge`) is not reused, whatever its status, as
    nginx keeps no connection whose request body was not all sent
    (`request_body_sent`). Bug: a 200 to an upload that the backend answered at
    its head and never read went back to the pool, and the reset that followed
    cost the next POST sent on it a 502. (Not a read after the last piece: a
    fast backend's whole answer is there by then, its connection lost.)"""
    parser = upstream.parser
    assert parser is not None  # `exchange` began it
    rhead = final_head(parser)
    if rhead is not None and rhead.status != 101:
        rhead.keep_alive = False


def _send_body(upstream: Upstream, data: Piece) -> None:
    """Send a piece of the request body (a span: from where it is); raises
    BackendAnswered if the backend closed after answering."""
    try:
        if isinstance(data, tuple):
            _send_backend_span(upstream, b"", data, False)
        else:
            _send_backend(upstream, data)
    except BackendClosed as exc:
        parser = upstream.parser
        assert parser is not None  # `exchange` began it
        rhead = final_head(parser)
        if rhead is None:
            try:
                rhead = _read_early(upstream, parser)
            except SSLWantWriteError:  # no answer to read: OpenSSL must write first
                raise exc from None
        if rhead is None:
            raise
        rhead.keep_alive = False  # the request was cut short: never reused
        raise BackendAnswered() from None


def _judge_answer(upstream: Upstream) -> Callable[[], BaseException | bool]:
    """What a backend's readiness while the body goes out means (`Stream.watch`):
    BackendAnswered (a complete answer, a refusal or an answer that closes), a
    ProxyError (it closed, or sent no HTTP), True (nothing final, or a success
    still coming: watch on) or False (a 101, a success past `EARLY_LIMIT`, or
    a read OpenSSL can make only after a write: the body goes on, and nothing
    more is read until it went)."""
    parser = upstream.parser
    assert parser is not None  # `exchange` began it

    def judge() -> BaseException | bool:
        try:
            rhead = _read_early(upstream, parser)
        except SSLWantWriteError:  # OpenSSL must write first and the socket is full:
            return False  # the body's next write (a greenlet's) waits for it and makes it
        except ProxyError as exc:
            return exc
        if rhead is None:  # nothing final: interim heads wait in the parser, bounded
            return True if interims(parser) <= MAX_INTERIM else BackendProtocolError(
                f"more than {MAX_INTERIM} interim (1xx) responses")
        if rhead.status >= REFUSAL or not rhead.keep_alive or (parser.complete
                                                           and rhead.status != 101):
            rhead.keep_alive = False  # the request was cut short: never reused
            return BackendAnswered()
        return rhead.status != 101 and _held(parser) <= EARLY_LIMIT
    return judge


def interims(parser: ResponseParser) -> int:
    """How many interim (1xx) heads wait in `parser` (an early answer's; a health
    check's, `balancer.health.read_status`)."""
    return sum(1 for event in parser.events
               if isinstance(event, ResponseHead) and event.status < 200 and event.status != 101)


def _held(parser: ResponseParser) -> int:
    """How many body bytes of an early answer wait in `parser`."""
    return sum(piece_size(event) for event in parser.events
               if isinstance(event, (bytes, tuple)))


def _read_early(upstream: Upstream, parser: ResponseParser) -> ResponseHead | None:
    """Read what the backend sent while the request body was still going out:
    the final response head if it came (the bytes wait in the parser). Raises
    BackendClosed if it closed, BackendProtocolError if it sent no HTTP,
    SSLWantWriteError as `_read_ready`."""
    data = _read_ready(upstream)
    if data is not None:
        _feed(parser, data)
    return final_head(parser)


def _send_backend(upstream: Upstream, data: bytes, last: bool = False) -> None:
    """Send request bytes; `last`: the request is whole and the response is
    awaited next, so they may be held (`balancer.outbox`)."""
    try:
        if last:
            upstream.stream.write_last(data)
        else:
            upstream.stream.write(data)
    except TimeoutError:
        raise BackendTimeout("backend did not accept the request in time") from None
    except OSError as exc:
        raise BackendClosed(read_failure(exc)) from None


def _send_backend_span(upstream: Upstream, head: bytes, span: Span, last: bool = True) -> None:
    """`_send_backend` of `head` then `span`'s bytes, side by side (`Stream.write_span`)."""
    try:
        if last:
            upstream.stream.write_last_span(head, span)
        else:
            upstream.stream.write_span(head, span)
    except TimeoutError:
        raise BackendTimeout("backend did not accept the request in time") from None
    except OSError as exc:
        raise BackendClosed(read_failure(exc)) from None


def _read_backend(upstream: Upstream) -> bytes:
    """Read once from the backend (waiting for data); maps every failure."""
    try:
        return upstream.stream.recv(RECV_SIZE)
    except TimeoutError:
        raise BackendTimeout("backend read timeout") from None
    except OSError as exc:
        raise BackendClosed(read_failure(exc)) from None


def _wait_backend(upstream: Upstream) -> None:
    """Wait until the backend's socket is readable (`Stream.wait_readable`)."""
    try:
        upstream.stream.wait_readable()
    except TimeoutError:
        raise BackendTimeout("backend read timeout") from None


def _read_ready(upstream: Upstream) -> bytes | None:
    """Read once from the backend if data is there (None: it is not, or a
    blocking stream cannot tell without waiting); maps every failure but
    SSLWantWriteError, raised as is: a TLS read that OpenSSL can make only
    after a write the full socket cannot take yet (its answer to a TLS 1.3
    key update, its refusal of a renegotiation). Bug: that was taken as the
    backend gone (a 502); each caller waits for writability its own way."""
    try:
        return upstream.stream.read_ready(RECV_SIZE)
    except SSLWantWriteError:
        raise
    except TimeoutError:
        raise BackendTimeout("backend read timeout") from None
    except OSError as exc:
        raise BackendClosed(read_failure(exc)) from None


def _read_after_write(upstream: Upstream) -> bytes | None:
    """`_read_ready` again, in a greenlet, after it raised SSLWantWrite: once the
    socket is writable (OpenSSL's write then goes out), as often as it asks."""
    while True:
        try:
            upstream.stream.wait_writable()
        except TimeoutError:
            raise BackendTimeout("backend read timeout") from None
        try:
            return _read_ready(upstream)
        except SSLWantWriteError:
            continue


def _feed(parser: ResponseParser, data: bytes) -> None:
    """Parse what a read gave (b"": the backend closed); maps every failure."""
    try:
        if data:
            parser.feed(data)
        else:
            parser.feed_eof()
    except ProtocolError as exc:
        if data:
            raise BackendProtocolError(exc.reason) from None
        raise BackendClosed(exc.reason) from None


def read_response_head(ex: Exchange, upstream: Upstream, continued: bool = False) -> ResponseHead:
    """The final (or 101) response head. Interim (1xx) responses go to an
    HTTP/1.1 client as they come (RFC 9110 §15.2: a proxy forwards them), but a
    100 when the balancer already sent its own (`continued`); an HTTP/1.0
    client never gets one.

    Waits for the answer to be there before the first read (`Stream.wait_readable`),
    unless part of it came while the body was sent (`_read_early`). Each read
    is bounded by `backend_read` from the one before (`_recv_head`), as nginx's
    `proxy_read_timeout` and HAProxy's `timeout server`: a head in pieces, or
    a `102 Processing` or `103 Early Hints` long before the final answer."""
    parser = upstream.parser
    assert parser is not None  # `exchange` began it
    events = parser.events
    if not events:  # `_wait_backend`, inline: one C frame less saved with the greenlet
        try:
            upstream.stream.wait_readable()
        except TimeoutError:
            raise BackendTimeout("backend read timeout") from None
    interim = 0
    while True:
        while not events:
            _recv_head(ex, upstream, parser)
        rhead: ResponseHead = events.pop(0)
        if rhead.status >= 200 or rhead.status == 101:
            return rhead
        interim += 1
        if interim > MAX_INTERIM:
            raise BackendProtocolError(f"more than {MAX_INTERIM} interim (1xx) responses")
        while True:  # an interim response has no body: its END follows
            while not events:
                _recv_head(ex, upstream, parser)
            if events.pop(0) is END:
                break
        if ex.head.version == b"1.1" and not (continued and rhead.status == 100):
            _send_interim(ex, rhead)
        ex.conn.arm(upstream.sock, ex.conn.ctx.backend_read)  # (what follows it: a read)


def _recv_head(ex: Exchange, upstream: Upstream, parser: ResponseParser) -> None:
    """Read once from the backend into `parser`; when that leaves no head
    whole, the next read is bounded by `backend_read` from this one (bug: the
    head's reads together were, since the request went: a head sent in
    pieces, or a final answer coming more than `backend_read` after the
    request though 1xx heads came meanwhile, was a 504), if it brought a byte
    of the head (`arm_head`)."""
    _feed(parser, _read_backend(upstream))
    if not parser.events:
        arm_head(ex.conn, upstream, parser)


def arm_head(conn: ClientConnection, upstream: Upstream, parser: ResponseParser) -> None:
    """After a read that left no head whole: bound the next by `backend_read`
    from now if a byte of the head came, the empty lines before a status line
    aside (`ResponseParser.head_begun`). Bug: a read of only those re-armed
    it too, and a backend that sent an empty line every `backend_read` held
    the request (and a backend connection) for ever: nothing bounds how
    many come, where a head's bytes are (`max_header_bytes`, `MAX_INTERIM`)."""
    if parser.head_begun():
        conn.arm(upstream.sock, conn.ctx.backend_read)


def _send_interim(ex: Exchange, rhead: ResponseHead) -> None:
    """Send a 1xx to the client at once (it is not the response: a failure
    after it still gets its error page)."""
    data = rhead.status_line + rhead.forwarded + b"\r\n\r\n"
    try:
        ex.conn.stream.write(data)
    except OSError as exc:
        raise ClientGone(str(exc)) from None
    ex.sent += len(data)


def response_head(ex: Exchange, rhead: ResponseHead) -> tuple[bytes, int]:
    """The response head for the client and how its body is framed."""
    lines, framing = head_pieces(ex, rhead)
    return b"".join(lines), framing


def head_pieces(ex: Exchange, rhead: ResponseHead) -> tuple[list[bytes], int]:
    """`response_head`'s bytes in pieces, to be joined with what follows them: one
    list made whole (appending to a list made full reallocates its array)."""
    head = ex.head
    if rhead.status == 101:  # Upgrade: what the backend switched to, of what was offered
        return [rhead.status_line, rhead.forwarded, ex.head_extra, REQUEST_ID, ex.request_id,
                b"\r\nConnection: upgrade\r\nUpgrade: %s\r\n\r\n"
                % (rhead.upgrade or head.upgrade)], RAW
    framing = RAW
    if not rhead.no_body and rhead.content_length is None:
        if head.version == b"1.1":
            framing = CHUNK
        else:
            framing = CLOSE
            ex.keep_alive = False
    if not ex.keep_alive:
        end = b"\r\nConnection: close\r\n\r\n"
    elif head.version == b"1.0":
        end = b"\r\nConnection: keep-alive\r\n\r\n"
    else:
        end = b"\r\n\r\n"
    if framing != CHUNK:
        return [rhead.status_line, rhead.forwarded, ex.head_extra, REQUEST_ID, ex.request_id,
                end], framing
    if rhead.announced:  # Trailer: what the trailers will be
        return [rhead.status_line, rhead.forwarded, ex.head_extra, REQUEST_ID, ex.request_id,
                CHUNKED, rhead.announced, end], CHUNK
    return [rhead.status_line, rhead.forwarded, ex.head_extra, REQUEST_ID, ex.request_id,
            CHUNKED, end], CHUNK


def relay_response(ex: Exchange, upstream: Upstream, rhead: ResponseHead, first: int = 0) -> bool:
    """Send the response to the client; returns whether `upstream` can be pooled.
    `first`: where its parser's events after the head begin (1: the head is
    still there, `deliver`)."""
    ex.status = rhead.status
    out, framing = head_pieces(ex, rhead)  # what goes next, joined at each send
    sock, parser = upstream.sock, upstream.parser
    assert parser is not None  # `exchange` made it
    events = parser.events
    ex.awaits = False  # (sending to the client; waiting on the backend again below)
    if parser.complete and framing == RAW:  # all of it came with the head: one send
        pieces = len(events) - 1 - first  # the body's, before its END (not popped:
        if pieces == 1:  # CPython would shrink the list's array, then free it at `clear`)
            body = events[first]
            events.clear()
            _send_with(ex, out, body, True)
        else:
            if pieces:
                out.extend([span_bytes(events[at]) for at in range(first, first + pieces)])
            events.clear()
            _send_out(ex, out, True)
        return rhead.keep_alive and not parser.upgraded
    if first:
        del events[:first]
    conn, timeouts = ex.conn, ex.conn.ctx.timeouts
    # A small fixed-length response is sent in one piece when its parts come
    # together though the backend wrote them apart (nginx: head by writev, body
    # by sendfile); what came is sent before waiting for more (bug: a body
    # dripped over 4 s held its head back for 4 s). A blocking stream (the
    # threaded baseline) cannot try a read without waiting: nothing is held there.
    hold = rhead.content_length is not None and rhead.content_length <= COALESCE_LIMIT
    turn = conn.io.turn()  # a slow reader yields its turn
    while True:
        for event in events:
            if event is END:
                if framing == CHUNK:  # a chunked response's trailers go on (docs/headers.md)
                    out.append(parser.last_chunk if rhead.chunked else LAST_CHUNK)
                events.clear()
                ex.awaits = False
                _send_out(ex, out, True)
                return rhead.keep_alive and not parser.upgraded
            if framing == CHUNK:
                out.append(frame_chunk(span_bytes(event)))
                continue
            if out and isinstance(out[-1], tuple):  # a span is only ever the last piece
                out[-1] = span_bytes(out[-1])
            out.append(event)
        events.clear()
        conn.arm(sock, timeouts.backend_read)
        try:
            got = _read_ready(upstream) if hold else None
        except SSLWantWriteError:
            got = _read_after_write(upstream)
        if got is None:
            if out:
                conn.arm(conn.sock, timeouts.client_idle)
                ex.awaits = False
                sent = _send_out(ex, out, False)
                out = []
                turn.spend(sent)
                conn.arm(sock, timeouts.backend_read)
            ex.awaits = True
            if hold:
                _wait_backend(upstream)  # it was not there: recv again only once readable
            got = _read_backend(upstream)
        _feed(parser, got)


def _send_out(ex: Exchange, out: list[Any], last: bool) -> int:
    """Send `out` (bytes, the last piece maybe a span) to the client in one write;
    how many bytes. A last piece that is a span, or bytes of `TAIL_MIN` or
    more after others, goes beside the others joined instead of being copied
    onto them (`Exchange.send_span`: one sendmsg of both)."""
    if out:
        tail = out[-1]
        if isinstance(tail, tuple) or (len(out) > 1 and len(tail) >= TAIL_MIN):
            out.pop()
            return _send_beside(ex, out, tail, last)
    data = b"".join(out)
    ex.send(data, last)
    return len(data)


def _send_with(ex: Exchange, out: list[Any], tail: Piece, last: bool) -> int:
    """`_send_out` of `out` with `tail` after it, `out` grown only when `tail` is
    joined to it (bytes under `TAIL_MIN`)."""
    if isinstance(tail, tuple) or (out and len(tail) >= TAIL_MIN):
        return _send_beside(ex, out, tail, last)
    out.append(tail)
    return _send_out(ex, out, last)


def _send_beside(ex: Exchange, out: list[Any], tail: Piece, last: bool) -> int:
    """Send `out` joined, and `tail` beside it (`Exchange.send_span`: one sendmsg
    of both, neither copied onto the other); how many bytes."""
    head = b"".join(out)
    if isinstance(tail, tuple):
        ex.send_span(head, tail, last)
        return len(head) + span_size(tail)
    ex.send_span(head, (tail, 0), last)
    return len(head) + len(tail)


class Flight:
    """One try of a request on one backend (`balancer.actions.proxy` makes them,
    `arrive` takes one to its end). The hub (`balancer.inline`) begins one for
    a request it serves (a pooled connection taken, the request sent) and, when
    it cannot end it there, leaves it on the exchange (`Exchange.flight`) for
    `arrive` to go on with, in a greenlet, from where it stopped."""

    __slots__ = ("backend", "stats", "upstream", "reused", "started", "sent", "error",
                 "answer", "reusable", "connecting")

    def __init__(self, backend: Backend, stats: BackendStats) -> None:
        self.backend = backend
        self.stats = stats  # the backend's counters in the rule's host
        self.upstream: Upstream | None = None  # the connection, once taken (`board`)
        self.reused = False  # taken from the pool
        self.started = 0.0  # CLOCK() when it was taken
        self.sent = False  # the request went whole: its answer is what comes next
        # what the hub's connect (no `upstream` then) or its read of the answer
        # raised, raised again by `arrive` where the greenlet's would have been
        self.error: ProxyError | None = None
        self.answer: ResponseHead | None = None  # the answer's head, once relayed (`deliver`)
        self.reusable = False  # ... and whether `upstream` can go back to its pool then
        # a new connection's connect the hub began and stopped waiting for (no
        # `upstream` yet): `arrive` waits for the rest of its connect timeout
        self.connecting: Connecting | None = None

    def board(self, upstream: Upstream, reused: bool, now: float = 0.0) -> None:
        """Take `upstream` for this try: in flight on its backend from now on
        (`now`: `CLOCK()` as read with nothing awaited since, the pool's check
        of a pooled connection's age; 0.0: read here)."""
        self.upstream = upstream
        self.reused = reused
        self.backend.in_flight += 1
        self.started = now if now else CLOCK()


def arrive(ex: Exchange, flight: Flight, body: Piece | None, max_body: int | None,
           verify: bool = True) -> None:
    """Take `flight` from where it is to its answer: a connection taken, the request
    sent, the answer read and relayed (`deliver`); the caller then lands it
    (`ProxyAction.landed`, which pools or closes the connection: `land`). Raises
    the ProxyError family on failure, the connection closed and no longer in
    flight on its backend. `verify`: an https:// backend's certificate is
    verified (`balancer.backend_tls`).

    A pooled connection that turns out closed before the response began, or
    whose answer is a 408 (`STALE`), is replaced by a fresh one, once,
    transparently, when the request can be replayed (`can_replay`).
    """
    backend, upstream = flight.backend, flight.upstream
    if upstream is None:
        upstream = _take(ex, flight, verify)
    # no `finally`: mypyc makes a smaller C frame without, and this frame is saved
    # with every greenlet waiting for its backend
    try:
        try:
            error = flight.error
            if error is not None:  # what the hub's read of the answer raised
                flight.error = None
                raise error
            if flight.sent:  # by the hub: the answer is next
                rhead = read_response_head(ex, upstream)
            else:
                rhead = exchange(ex, upstream, body, max_body)
            # one int compare per request; the rest only for a 408 (`STALE`)
            if rhead.status == 408 and flight.reused and can_replay(ex, body):
                raise BackendClosed(STALE)  # replayed on a fresh connection below
        except BackendClosed as closed:
            upstream.close()
            if not flight.reused or not can_replay(ex, body, closed):
                raise  # a fresh connection failed, the body is gone, or it may not go twice
            upstream = renew(ex, backend, upstream)
            rhead = exchange(ex, upstream, body, max_body)
        deliver(ex, flight, upstream, rhead)
    except BaseException:
        backend.in_flight -= 1
        upstream.close()
        raise


def may_go_twice(method: bytes) -> bool:
    """Whether a request of `method` may reach a backend twice (`IDEMPOTENT`): a
    GET and a POST told by one compare each (the set's lookup hashes the method,
    a new bytes object per request: ~190 instructions)."""
    if method == b"GET":
        return True
    return method != b"POST" and method in IDEMPOTENT


def can_replay(ex: Exchange, body: Piece | None, closed: BackendClosed | None = None) -> bool:
    """Whether `ex`'s request can go again on a new connection to the same backend
    (a pooled one's replacement, `arrive`): it has no body, or its body is in
    hand (`body`), not streamed; and after `closed` (the pooled connection
    closed before an answer) it is `IDEMPOTENT`, unless that close is a 408's
    (`STALE`: the request was not processed)."""
    if body is None and ex.head.has_body:
        return False
    return closed is None or may_go_twice(ex.head.method) or closed.args == (STALE,)


def _take(ex: Exchange, flight: Flight, verify: bool) -> Upstream:
    """A connection for `flight`: pooled (the pool hands out only one found open
    and untouched: `Backend.acquire_idle`), else new; raises ConnectError. A
    connect the hub began goes on from where it is: it failed (`Flight.error`,
    raised here, where the connect's is, and counted once by the action), or it
    is still in progress (`Flight.connecting`: waited for until its timeout)."""
    backend = flight.backend
    error = flight.error
    if error is not None:
        flight.error = None
        raise error
    connecting = flight.connecting
    if connecting is not None:  # (its deadline armed by the hub: `inline._connect`)
        flight.connecting = None
        upstream = backend.resume_connect(connecting.sock, connecting.by)
        flight.board(upstream, False)
        return upstream
    key = "" if backend.tls is None else pool_key(ex.head.host, verify)
    now = CLOCK()  # (the pool's check of an idle connection's age, and `board`'s)
    idle = backend.acquire_idle_tls(key, now) if key else backend.acquire_idle(now)
    if idle is not None:
        flight.board(idle, True, now)
        return idle
    arm_connect(ex, backend)
    upstream = backend.connect_tls(key) if key else backend.connect()
    flight.board(upstream, False)
    return upstream


def arm_connect(ex: Exchange, backend: Backend) -> None:
    """Before a new connection to `backend` for `ex` (never for a pooled one): the
    client connection's deadline armed to the connect's own bound
    (`Backend.connect_bound`), not left at what it was while the request came
    (client_idle since the connection went idle, client_header since the head's
    first byte). The connect timeout then fires first (the backend's failure);
    the deadline cuts only what it does not bound (`ConnectOverdue`). What
    follows arms again: the request sent (backend_read), the body's reads
    (client_idle).

    Invariant: the deadline is never before the connect's own timeout, which
    starts after it, from the clock: so it is armed from the clock too
    (`arm_exactly`), not from the watchdog's last tick (bug: after a stall
    that tick was older than the margin, and the deadline cut a connect that
    still had time: a 504, not the backend's failure). When both passed (a
    loop stalled past them), the connect's timeout is what the request
    reports, whichever the loop runs first (`Backend._overdue`)."""
    conn = ex.conn
    conn.arm_exactly(conn.sock, backend.connect_bound)
    ex.awaits = False  # (a connect: not watched for a hang-up)


def renew(ex: Exchange, backend: Backend, upstream: Upstream) -> Upstream:
    """A new connection like `upstream` (`Backend.renew`) for `ex`, its deadline
    armed first (`arm_connect`)."""
    arm_connect(ex, backend)
    return backend.renew(upstream)


def deliver(ex: Exchange, flight: Flight, upstream: Upstream, rhead: ResponseHead,
            first: int = 0, now: float = 0.0) -> None:
    """Relay the answer whose head is `rhead` on `upstream` (or tunnel after a 101),
    noted on `flight` for `land`: `upstream`, `answer` and `reusable` (whether the
    connection can go back to its pool). `first` 1: `rhead` is still its
    parser's first event (the hub's, `balancer.inline`: taking the first item
    out of a list moves the others), not a 101's. `now`: `CLOCK()` as the
    answer's head came (the hub's `_land`, which reads it once for the
    answer's steps); 0.0: read here."""
    ex.backend_time = (now if now else CLOCK()) - flight.started
    flight.upstream, flight.answer = upstream, rhead
    if rhead.status == 101:
        if not ex.head.upgrade:
            raise BackendProtocolError("101 Switching Protocols to a request without Upgrade")
        if not is_offered(rhead.upgrade, ex.head.upgrade):
            raise BackendProtocolError("101 Switching Protocols to a protocol not offered")
        _upgrade(ex, upstream, rhead)
        return  # (the tunnel is over: never reusable)
    flight.reusable = relay_response(ex, upstream, rhead, first) and not ex.head.upgrade \
        and (rhead.status < REFUSAL or not ex.head.has_body)


def land(flight: Flight, now: float = 0.0) -> None:
    """The try answered (`deliver`): no longer in flight on its backend, and its
    connection back to its pool, or closed, whatever raises on the way (a bug:
    the connection is then closed, never left open out of the pool). `now`:
    `CLOCK()` as read with nothing awaited since (`Backend.release`)."""
    backend, upstream, answer = flight.backend, flight.upstream, flight.answer
    assert upstream is not None and answer is not None  # `deliver` noted them
    backend.in_flight -= 1  # (first: nothing before it can raise)
    try:
        # a new TLS connection answered: its session serves the next ones (not a tunnel's)
        if upstream.fresh and answer.status != 101:
            backend.keep_session(upstream)
        if flight.reusable:
            backend.release(upstream, now)
            return
    except BaseException:
        upstream.close()
        raise
    upstream.close()


def dispatch(ex: Exchange, upstream: Upstream, body: Piece | None,
             max_body: int | None) -> bool:
    """Send the request on `upstream` (its response parser begun first: an answer
    may come while a body streams); whether the body streamed."""
    conn, sock = ex.conn, upstream.sock
    timeout = conn.ctx.backend_read
    conn.arm(sock, timeout)
    ex.awaits = True
    parser = upstream.parser
    for_head = ex.head.method == b"HEAD"
    if parser is None:
        upstream.parser = ResponseParser(conn.ctx.limits, for_head, conn.ctx.response_callbacks,
                                         upstream.heads())
    else:
        parser.begin(for_head)
    streamed = send_request(ex, upstream, body, max_body)
    if streamed:  # reading the client's body armed the client's timeout
        conn.arm(sock, timeout)
    return streamed


def exchange(ex: Exchange, upstream: Upstream, body: Piece | None,
             max_body: int | None) -> ResponseHead:
    """Send the request on `upstream` and read the response head."""
    streamed = dispatch(ex, upstream, body, max_body)
    # a streamed body behind Expect: 100-continue got the balancer's own 100
    return read_response_head(ex, upstream, streamed and ex.head.expect_continue)


def take_ready(upstream: Upstream) -> bool:
    """Parse what the backend sent if something is there (False: nothing was;
    True with nothing parsed when OpenSSL must write before it reads, which
    the hub cannot wait for); raises the ProxyError family as a read in
    `read_response_head` would."""
    try:
        data = _read_ready(upstream)
    except SSLWantWriteError:  # a greenlet waits for the socket to be writable:
        return True  # nothing parsed, so `inline._land` hands the try over
    if data is None:
        return False
    parser = upstream.parser
    assert parser is not None  # `dispatch` began it
    _feed(parser, data)
    return True


def is_offered(chosen: bytes, offered: bytes) -> bool:
    """Whether every protocol of a 101's Upgrade was in the request's (RFC 9110
    §7.8: a server must not switch to another; through a tunnel a client could
    then speak, say, h2c to the backend past the balancer's per-request rules)."""
    asked = {token.strip().lower() for token in offered.split(b",")}
    asked |= {token.partition(b"/")[0] for token in asked}  # "foo" of "foo/2" too
    return all(token.strip().lower() in asked for token in chosen.split(b","))


def _upgrade(ex: Exchange, upstream: Upstream, rhead: ResponseHead) -> None:
    """Switch to a two-way tunnel after the backend accepted the upgrade."""
    ex.status = 101
    data, _ = response_head(ex, rhead)
    parser = upstream.parser
    assert parser is not None  # `exchange` made it
    ex.send(data + parser.leftover)
    try:
        upstream.stream.finish()  # the request went out before its answer came
    except OSError as exc:
        raise BackendClosed(read_failure(exc)) from None
    conn = ex.conn
    client_leftover = conn.parser.leftover + conn.stream.unread()
    ex.keep_alive = False
    ex.body_done = True
    ex.awaits = False  # a tunnel passes a client's end on as a half-close
    conn.disarm()
    sent, received = tunnel(conn.stream.cooperative(), upstream.stream.cooperative(),
                            client_leftover, conn.ctx.timeouts.tunnel_idle)
    ex.sent += sent
    ex.received += received
