"""One client connection: read → parse → route → act, request after request.

Invariants:
* Every request is routed on its own against the table snapshot current
  when its head was parsed (keep-alive and pipelining included).
* Responses leave in request order: a request is answered completely before
  the next head is taken from the parser. A malformed request read together
  with complete ones before it is answered after them (`broken`), as nginx
  and HAProxy do: its error page is never taken for their answer.
* `ProxyError` and `ProtocolError` become pages here and nowhere else; once
  response bytes were sent, an error can only close the connection.
* Sockets are read and written through the worker's `balancer.netio.IO`
  (`ctx.io`): its streams, its deadlines. The threaded baseline runs the very
  same code with the blocking `IO`.
* Between requests, with nothing pipelined, a connection is parked where the
  IO can (`GeventIO.park`; at once after a request the hub serves or when
  the worker is crowded, else after PARK_AFTER idle): no greenlet waits for
  it, `resume_client` goes on when it is readable and `expire_client`
  closes it at its deadline.
* A new plain connection starts parked (`Context.start`, under gevent): its
  first request is waited for and served as a keep-alive connection's next.
  A TLS one (and every one of the threaded baseline) starts in its own task
  (`handle_client`), which reads it.
* The hub (`balancer.inline`) serves a parked connection's common request
  with these same steps (`take`, `begin`, `finish`, `conclude`, `park`);
  whatever it leaves is a state `serve` goes on from: bytes in the parser
  (`head_due`, `broken`), or the `exchange` in flight (`proceed`).
* A connection closed after a response while its client may still be sending
  (`linger`: a body not all read or whose framing broke, a refused head, a
  keep-alive the balancer ends) lingers (`balancer.lingering`: half-closed,
  parked, what still comes read and dropped, within bounds) so that the client
  reads its response instead of a reset; any other close is immediate.
* Every wait is bounded by `arm`: with socket timeouts (blocking `IO`), or
  under gevent by a per-connection deadline that the worker's watchdog
  enforces by raising TimeoutError in the overdue greenlet. gevent socket
  timeouts cost a timer per call; the watchdog costs one float per phase.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from balancer.accesslog.records import held_bytes, refused_record
from balancer.clients import client_key
from balancer.errors import ClientGone, ProxyError
from balancer.http11 import (
    END,
    LOWER,
    Limits,
    ProtocolError,
    RequestCallbacks,
    RequestHead,
    RequestParser,
    mark_value,
)
from balancer.netio import CLOCK, IO, NEVER, ParkNow
from balancer.response_parser import ResponseCallbacks
from balancer.responses import local_response
from balancer.spans import Piece, Span, join_pieces, piece_size, span_size

if TYPE_CHECKING:
    from balancer.accesslog import AccessLog
    from balancer.pages import Pages
    from balancer.settings import TimeoutSettings
    from balancer.sketch import Tally
    from balancer.stats import Stats
    from balancer.table import Route, TableHolder

RECV_SIZE: Final = 65536
ACME_PATH: Final = b"/.well-known/acme-challenge/"  # HTTP-01 (balancer.challenges)
DOT: Final = 46  # b"."
HEX_BYTE: Final = tuple(b"%02x" % i for i in range(256))  # a request id's last two digits
DRAIN_LIMIT: Final = 1 << 20  # bytes of an unused request body read to keep a connection alive
# `ClientConnection.linger`: what its close does (balancer.lingering)
CLOSE: Final = 0  # close at once
LINGER: Final = 1  # linger, if the worker can: the client may still be sending
LINGERING: Final = 2  # lingering now (counted in `Stats.lingering_connections`)

PROTOCOL_PAGES: Final = {
    400: "bad-request", 408: "request-timeout", 413: "payload-too-large",
    414: "uri-too-long", 417: "expectation-failed", 431: "headers-too-large",
    501: "not-implemented", 505: "version-not-supported", 421: "misdirected-request",
}


class Context:
    """What every connection of one listener shares; read-only after start, except
    `draining`, which the worker sets once when it stops: from then on every
    response closes its connection."""

    def __init__(self, *, holder: TableHolder, pages: Pages, stats: Stats,
                 access_log: AccessLog, trusted: bool, limits: Limits,
                 timeouts: TimeoutSettings, io: IO, spin_max_waiting: int = 10000,
                 scheme: bytes = b"http", challenges: Any = None,
                 shared_callbacks: bool = False, lingering: Any = None) -> None:
        self.holder = holder
        self.pages = pages
        self.stats = stats
        self.access_log = access_log
        self.trusted = trusted
        self.limits = limits
        self.timeouts = timeouts
        # the two read on every keep-alive request, as native floats (an attribute of
        # the settings object is looked up by name)
        self.client_idle: float = timeouts.client_idle
        self.backend_read: float = timeouts.backend_read
        self.spin_max_waiting = spin_max_waiting  # the cap is counted by balancer.hold
        self.request_ids = RequestIds()
        self.io = io  # the worker's I/O: streams and deadlines
        self.scheme = scheme  # b"https" on TLS listeners (X-Forwarded-Proto)
        # ACME HTTP-01 answers (balancer.challenges.Challenges), asked only for
        # targets under ACME_PATH
        self.challenges: Any = challenges
        self.draining = False
        # httptools' callbacks, shared by the listener's parsers when one thread
        # feeds them all (gevent's: `balancer.http11.RequestCallbacks`); None: each
        # parser has its own (the threaded baseline)
        self.request_callbacks = RequestCallbacks() if shared_callbacks else None
        self.response_callbacks = ResponseCallbacks() if shared_callbacks else None
        # the worker's `balancer.lingering.Lingering`; None: connections never linger
        self.lingering: Any = lingering
        # the worker's certificates (`balancer.tls_certs.ServedCerts`: `matches_sni`,
        # `epoch`), on a TLS listener with tls.refuse_domain_fronting; None elsewhere
        self.sni_certs: Any = None
        self.misdirected: Any = None  # with `sni_certs`: `balancer.table.misdirected`

    def serve(self, sock: socket.socket, address: Any) -> bool:
        """`handle_client` for a connection of this listener: what the worker's
        `balancer.serving.Slots` call (a bound method: no `functools.partial`,
        whose call copied its keywords into a new dict and added three C frames
        to the greenlet's stack, for as long as the connection was served)."""
        self.stats.open_connections += 1  # `handle_client`, inline: one C frame less
        conn = ClientConnection(sock, address, self)
        self.io.attach(conn)
        return run_client(conn)

    def start(self, sock: socket.socket, address: Any) -> None:
        """A new connection of this (plain) listener, just accepted, in the hub (the
        worker's `Slots.accept` counted it open; gevent only): it waits for its
        first request parked, with no greenlet, as a keep-alive connection waits
        for its next (`idle`, within client_idle: a draining worker closes it),
        and that request goes to the hub first (`GeventIO.start`). A greenlet
        started here read at once and then waited the same way; now one serves
        the connection only when the hub hands it over (`balancer.inline`)."""
        io: Any = self.io
        try:
            conn = ClientConnection(sock, address, self)
        except BaseException:
            sock.close()
            io.on_closed()
            raise
        self.stats.open_connections += 1
        conn.arm(sock, self.client_idle)
        conn.idle = True
        io.start(conn)


class RequestIds:
    """Unique request ids: a random per-process prefix and a counter in hex, at
    least 8 digits (``b"%s%08x" % (prefix, count)``). Its last two digits come
    from a table and the rest is formatted once per 256 ids: bytes formatting
    cost ~1,600 instructions per request."""

    def __init__(self) -> None:
        self.prefix = os.urandom(6).hex().encode()
        self.count = 0
        self.high = self.prefix + b"000000"  # the prefix and count >> 8, "%06x"

    def next(self) -> bytes:
        count = self.count + 1
        self.count = count
        low = count & 255
        if not low:
            self.high = b"%s%06x" % (self.prefix, count >> 8)
        return self.high + HEX_BYTE[low]


class Exchange:
    """One request and what has happened to it so far."""

    __slots__ = ("conn", "head", "route", "request_id", "start", "status", "sent", "received",
                 "head_extra",
                 "backend", "backend_time", "keep_alive", "started", "body_done", "flight",
                 "awaits")

    def __init__(self, conn: ClientConnection, head: RequestHead, route: Route,
                 request_id: bytes, start: float) -> None:
        self.conn = conn
        self.head = head
        self.route = route
        self.request_id = request_id
        self.start = start
        self.status = 0
        self.sent = 0
        self.received = 0
        self.backend = ""
        self.backend_time = 0.0
        self.keep_alive = head.keep_alive
        self.started = False   # response bytes were sent to the client
        self.body_done = not head.has_body
        self.head_extra = b""  # response fields of the rule (HSTS), b"\r\nName: value" each
        # a try on a backend that `balancer.inline` began in the hub and left to the
        # action to go on with (`balancer.relay.Flight`); None: none
        self.flight: Any = None
        # waiting on its backend: the request being sent, or the answer's next
        # bytes (`balancer.relay`); the watchdog drops it if its client hangs up
        # meanwhile, its body all read (`GeventIO.expire`)
        self.awaits = False

    def send(self, data: bytes, last: bool = False) -> None:
        """Send response bytes to the client; a dead client raises ClientGone.
        `last`: the response ends with them, so they may be held to the end of
        the loop iteration (`balancer.outbox`; a client gone by then is found
        by the next read)."""
        self.started = True
        stream = self.conn.stream
        try:
            if last:
                stream.write_last(data)
            else:
                stream.write(data)
        except OSError as exc:
            raise ClientGone(str(exc)) from None
        self.sent += len(data)

    def send_span(self, head: bytes, span: Span, last: bool = False) -> None:
        """`send` of `head` then the bytes of `span`, which are not copied out
        (nor joined to `head`) where the stream can send both at once."""
        self.started = True
        stream = self.conn.stream
        try:
            if last:
                stream.write_last_span(head, span)
            else:
                stream.write_span(head, span)
        except OSError as exc:
            raise ClientGone(str(exc)) from None
        self.sent += len(head) + span_size(span)

    def respond(self, status: int, body: bytes, content_type: bytes,
                extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """Answer with a local response (the request body is discarded first)."""
        if self.conn.ctx.draining:  # a request held into the drain closes its connection
            self.keep_alive = False
        self.conn.discard_body(self)
        head = self.head
        self.status = status
        if self.head_extra:
            extra = (*extra, *_fields(self.head_extra))
        self.send(local_response(
            status, body, content_type, request_id=self.request_id,
            keep_alive=self.keep_alive, version=head.version,
            head_only=head.method == b"HEAD", extra=extra), last=True)

    def respond_page(self, name: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        page = self.conn.ctx.pages.get(name)
        self.respond(page.status, page.body, page.content_type, extra)

    def body_chunks(self) -> Iterator[Piece]:
        """The request body as it arrives, bytes or spans: a Content-Length body's
        bytes, a chunked body's framing (`balancer.chunks`)."""
        for chunk in self.conn.body_chunks():
            self.count_body(chunk)
            yield chunk
        self.body_done = True

    def count_body(self, piece: Piece) -> None:
        """Count a body piece in `received`: its bytes, or for a chunked body the
        data bytes read so far (framing removed, as the access log says)."""
        chunks = self.head.chunks
        if chunks is None:
            self.received += piece_size(piece)
        else:
            self.received = chunks.decoded


class ClientConnection:
    """Serves one client connection to the end."""

    def __init__(self, sock: socket.socket, address: Any, ctx: Context) -> None:
        self.sock = sock
        self.io = ctx.io
        self.stream = ctx.io.stream(sock)
        self.client_ip = address[0] if isinstance(address, tuple) else str(address)
        self.client_ip_bytes = self.client_ip.encode()
        # what limits and heavy hitters count; an IPv4 address is its own key (no
        # call: this runs per connection)
        ip = self.client_ip
        self.client_key = ip if ":" not in ip else client_key(ip)
        self.forwarded_fields = b""  # what balancer.forwarding says of this client, once made
        # balancer.forwarding's rewrite of the parser's `repeat_head`: (head, the bytes
        # before the request id, those after it)
        self.forwarded: tuple[RequestHead, bytes, bytes] | None = None
        self.exchange: Exchange | None = None  # the request being handled
        # tls.refuse_domain_fronting: the last Host value found to match; first a value
        # no Host has (bug: b"", a request's without a Host, went unchecked to `*`);
        # and the certificates it matched under (`ServedCerts.epoch`)
        self.allowed = b"\n"
        self.allowed_under: Any = None
        self.ctx = ctx
        self.parser = RequestParser(ctx.limits, ctx.request_callbacks)
        self.events = self.parser.events  # a list: `pop(0)` is a C call under mypyc
        self.deadline = NEVER  # enforced by the watchdog (gevent's `IO`)
        self.task: Any = None  # the greenlet serving this connection (gevent's `IO`);
        # None while it is parked between requests
        # True only while waiting for the first byte of a request: closing the
        # connection then loses nothing (a draining worker does so)
        self.idle = False
        self.park_due = False  # the watchdog asked to park this idle connection
        # the error of a malformed request that came after complete ones in the same
        # read: raised once they are answered (`defer`)
        self.broken: ProtocolError | None = None
        self.linger = CLOSE  # what closing it does: CLOSE, LINGER or LINGERING
        # part of a head came: the rest must come by then (time.monotonic; 0.0: no
        # head begun), from its first byte (client_header)
        self.head_due = 0.0
        # where its last request was counted in the heavy hitters (`balancer.sketch`;
        # made by a keep-alive one)
        self.tally: Tally | None = None

    def close(self) -> None:
        """Send what is still held (within client_idle), then close everything.
        (try/except, not contextlib.suppress: this runs for every connection that
        closes after its response, and suppress is three Python-level calls.)"""
        stream = self.stream
        if stream.has_held():
            # no longer waiting for a request: the watchdog must time this wait out,
            # not ask it to park (bug: its ParkNow escaped, and a client that never
            # read again kept the connection open for ever)
            self.idle = False
            self.arm(self.sock, self.ctx.timeouts.client_idle)
            try:  # noqa: SIM105 - see above
                stream.finish()
            except (OSError, TimeoutError):
                pass
        stream.close()
        self.parser.close()

    def arm(self, sock: socket.socket, seconds: float) -> None:
        """Bound the next waits on `sock` (and any other) to `seconds` from now."""
        self.deadline = self.io.arm(sock, seconds)

    def arm_exactly(self, sock: socket.socket, seconds: float) -> None:
        """`arm` from the clock as it is, not the watchdog's last tick (`IO.arm_exactly`)."""
        self.deadline = self.io.arm_exactly(sock, seconds)

    def disarm(self) -> None:
        """No deadline (a held request waits on its own timeout)."""
        self.deadline = NEVER

    def serve(self) -> bool:
        """Handle requests until the client or a response closes the connection
        (False), or until it waits for its next request parked (True: open,
        with no task of its own until its next readiness; `IO.park`)."""
        try:
            ex = self.exchange  # one the hub began (`balancer.inline`), to go on with
            head = self.read_head(False) if ex is None else None
            while True:
                while True:
                    if ex is None:
                        if head is None:
                            break
                        ex = self.begin(head)
                    if not self.proceed(ex):
                        return False
                    if self.io.parks_at_once(ex) and self.park(self.io.is_crowded()):
                        return True
                    ex = None
                    # after a response the next request is rarely there yet: wait first
                    head = self.read_head(True)
                if not self.park_due:
                    return False
                self.park_due = False  # idle for PARK_AFTER: the watchdog said park
                if self.park():
                    return True
                head = self.read_head(True)
        except ProtocolError as exc:
            self.reject(exc)
        return False

    def park(self, forget: bool = True) -> bool:
        """Between requests with none pipelined: wait parked (within client_idle)
        if the IO can; whether it did. Right after a response when the IO says so
        (`IO.parks_at_once`: its hub serves the next request, or the worker is
        crowded), else once the watchdog found it idle for PARK_AFTER. With
        `forget`, it keeps no repeated head (`RequestParser.repeat_head`) nor its
        rewrite: idle, or one of very many, it holds as little memory as it can
        (one parked right after a response forgets them once idle for PARK_AFTER,
        `GeventIO.expire`)."""
        events = self.events
        while events and events[0] is END:
            events.pop(0)
        if events or self.parser.upgraded or self.broken is not None:
            return False
        if not self.idle:  # straight after a response: the idle wait starts now
            self.arm(self.sock, self.ctx.client_idle)
            self.idle = True
        if forget:
            self.forget()
        return self.io.park(self)

    def forget(self) -> None:
        """Keep no repeated head nor its rewrite (memory; parsed whole next time)."""
        self.forwarded = None
        self.parser.forget_repeat()

    def remembers(self) -> bool:
        """Whether it keeps a repeated head or its rewrite (`forget`)."""
        return self.forwarded is not None or self.parser.repeat_head is not None

    def read_head(self, wait_first: bool) -> RequestHead | None:
        """The next request head, or None when the connection should close."""
        events, sock, stream = self.events, self.sock, self.stream
        while events:
            event = events.pop(0)
            if event is not END:  # a bodyless request's END stays until here (unless `take`
                # took it with its head: nothing came after them)
                return event
        if self.broken is not None:  # the requests read before it are answered
            raise self.broken
        if self.head_due:  # part of a head came (read in the hub: `balancer.inline`)
            self.arm(sock, max(self.head_due - time.monotonic(), 0.001))
        else:
            self.arm(sock, self.ctx.client_idle)
            self.idle = True
        while True:
            try:
                if wait_first:
                    wait_first = False
                    stream.wait_readable()
                data = stream.recv(RECV_SIZE)
            except TimeoutError:
                if self.head_due:
                    raise ProtocolError(408, "request head timeout") from None
                return None
            except ParkNow:
                self.park_due = True  # only thrown while idle: nothing of a head came
                return None
            except OSError:
                return None
            if not data:
                return None
            head = self.take(data)
            if head is not None:
                return head
            self.arm(sock, max(self.head_due - time.monotonic(), 0.001))

    def take(self, data: bytes) -> RequestHead | None:
        """Parse `data`, read from the client: the next request head if it is
        complete now, else None (then part of a head came: the rest must come
        within client_header of its first byte, `head_due`). Raises the
        ProtocolError of a malformed request that no complete one came before."""
        self.idle = False
        head = self.parser.again(data)  # a repeated bodyless head, nothing queued before it
        if head is not None:
            self.head_due = 0.0
            return head
        try:
            self.parser.feed(data)
        except ProtocolError as exc:
            self.defer(exc)
        events = self.events
        if len(events) == 2 and events[1] is END:  # one whole request, nothing after it
            head = events[0]
            if isinstance(head, RequestHead) and not head.has_body:
                # its END says nothing a bodyless head does not (`park` and `read_head`
                # skip it): both go at once, the list emptied in one step (popped one
                # by one, CPython shrank its array twice, ~600 instructions)
                events.clear()
                self.head_due = 0.0
                return head
        while events:
            event = events.pop(0)
            if event is not END:
                self.head_due = 0.0
                return event
        if not self.head_due:
            self.head_due = time.monotonic() + self.ctx.timeouts.client_header
        return None

    def handle(self, head: RequestHead) -> bool:
        """Route and answer one request; returns whether to keep the connection."""
        return self.proceed(self.begin(head))

    def begin(self, head: RequestHead) -> Exchange:
        """The exchange of request `head`: routed, counted, with its id; in flight
        from now on (`exchange`) until `finish`."""
        ctx = self.ctx
        start = CLOCK()
        route = ctx.holder.table.lookup(head.host)
        if ctx.sni_certs is not None:  # a TLS listener with tls.refuse_domain_fronting
            route = self.fronting(head.host, route)
        stats = route.stats
        stats.open_requests += 1
        if not stats.marked:  # the host's first request of the heavy-hitter interval
            ctx.stats.mark(route.key, stats)
        request_id = self.trusted_id(head) if ctx.trusted else ctx.request_ids.next()
        ex = Exchange(self, head, route, request_id, start)
        if ctx.draining:
            ex.keep_alive = False
        self.exchange = ex  # in flight (balancer.diagnosis reads it)
        return ex

    def fronting(self, host: bytes, route: Route) -> Route:
        """`route`, or the same host's route answering 421 when this TLS
        connection's certificate is not the one `host` gets with the certificates
        served now (`ctx.sni_certs`); a comparison and a look-up per request while
        the Host value and the certificates are those found to match. Bug: a Host
        once found to match stayed so for the connection's life, its certificate
        changed since (another stored for it: its requests were to get a 421)."""
        certs = self.ctx.sni_certs
        epoch = certs.epoch
        if host == self.allowed and epoch is self.allowed_under:
            return route
        if certs.matches_sni(getattr(self.sock, "sni_host", None), host):  # `pick_noting`
            self.allowed, self.allowed_under = host, epoch
            return route
        return self.ctx.misdirected(route)

    def proceed(self, ex: Exchange) -> bool:
        """Answer the exchange in flight (`begin`): the rule's action (which goes on
        with a try the hub began, `Exchange.flight`), every error made a response
        here; `finish` and `conclude` it. Whether to keep the connection."""
        route = ex.route
        gone = False
        try:
            limit = route.limit
            if is_challenge(ex.head.target) and self.answer_challenge(ex):
                pass  # an ACME HTTP-01 validation, answered before the rule
            elif limit is None:
                route.action.handle(ex)
            else:
                limit.run(ex)  # balancer.limits: the action, or 429
        except ProxyError as exc:
            self.fail(ex, exc)
        except ProtocolError as exc:
            self.fail(ex, exc)
        except ClientGone as exc:
            ex.keep_alive = False
            ex.status = ex.status or exc.status
            gone = True
        finally:
            self.finish(ex)
        # a client gone gets nothing more: closed at once, never lingering (bug: one
        # that read nothing of its answer for client_idle, as nginx's send_timeout,
        # then had what was held of it sent within client_idle again, and lingered)
        return False if gone else self.conclude(ex)

    def finish(self, ex: Exchange, now: float = 0.0) -> None:
        """The exchange is over (answered, or failed): counted, noted, logged.
        `now`: `CLOCK()` as read by the caller with nothing awaited since (the
        hub's `_land`); 0.0: read here."""
        ctx = self.ctx
        self.exchange = None
        elapsed = (now if now else CLOCK()) - ex.start
        stats = ex.route.stats
        stats.finish(ex.status, ex.received, ex.sent, elapsed)
        ctx.stats.top.note(ex, stats.paths)
        if ctx.access_log.is_enabled:
            log_access(ctx.access_log, ex, elapsed)

    def conclude(self, ex: Exchange) -> bool:
        """After a finished exchange: whether to keep the connection (an unused
        request body skipped first; a refused Upgrade leaves it HTTP; one that
        closes lingers if its client may still be sending)."""
        if not ex.keep_alive and ex.started and self.may_send_more(ex):
            self.linger = LINGER
        if ex.keep_alive and not ex.body_done:
            self.discard_body(ex)
        if self.parser.upgraded and ex.keep_alive:
            self.parser.resume()  # the Upgrade was not accepted: the connection stays HTTP
        return ex.keep_alive

    def may_send_more(self, ex: Exchange) -> bool:
        """After a response that closes the connection: whether its client may
        still be sending (closing at once could reset it before it read the
        response): the request body was not all read, or the client asked to
        keep the connection (its next request may be on its way: RFC 9112 §9.6;
        a malformed one may have come already, `broken`). Not after a tunnel.
        (A `Connection: close` request read whole never lingers: the parser
        takes nothing after it, and an END left in `events` is no byte.)"""
        return ex.status != 101 and (not ex.body_done or ex.head.keep_alive
                                     or self.broken is not None)

    def answer_challenge(self, ex: Exchange) -> bool:
        """Whether `ex` was an ACME HTTP-01 validation request, now answered."""
        challenges = self.ctx.challenges
        return challenges is not None and bool(challenges.answer(ex))

    def trusted_id(self, head: RequestHead) -> bytes:
        """The request's X-Request-Id (trusted listeners keep it), else a new one."""
        for mark in head.marks:
            if mark[0] == b"x-request-id":
                value = mark_value(head, mark)
                if value:
                    return value
        return self.ctx.request_ids.next()

    def fail(self, ex: Exchange, exc: ProxyError | ProtocolError) -> None:
        """The one place an error becomes a response (or a closed connection)."""
        if isinstance(exc, ProxyError) and exc.cause:  # a 502/504: counted for the log
            self.ctx.stats.note_failure(ex.route.key, ex.route.stats, exc.cause, exc)
        if ex.started:
            ex.keep_alive = False
            ex.status = ex.status or 502
            return
        if isinstance(exc, ProtocolError):
            ex.keep_alive = False
            ex.body_done = True  # not to be read on: its framing broke
            self.linger = LINGER  # the rest of it may be on its way
            page = PROTOCOL_PAGES.get(exc.status, "bad-request")
            extra: tuple[tuple[bytes, bytes], ...] = ()
        else:
            page = exc.page
            extra = ((b"Retry-After", b"%d" % exc.retry_after),) if exc.retry_after else ()
        try:
            ex.respond_page(page, extra)
        except ClientGone:
            ex.keep_alive = False

    def reject(self, exc: ProtocolError) -> None:
        """Answer a malformed request head and close (no routing happened); it
        is logged with what is known: client, status, bytes, request id (the
        head's fields are not read: the access log shows them as missing)."""
        ctx = self.ctx
        page = ctx.pages.get(PROTOCOL_PAGES.get(exc.status, "bad-request"))
        request_id = ctx.request_ids.next()
        data = local_response(page.status, page.body, page.content_type,
                              request_id=request_id, keep_alive=False)
        sent = 0
        with contextlib.suppress(OSError):
            self.stream.write(data)
            sent = len(data)
            if exc.status != 408:  # a client too slow to send its head is not waited for
                self.linger = LINGER  # the rest of the head, its body may be on the way
        if ctx.access_log.is_enabled:
            record = refused_record(time.time(), self.client_ip, page.status, sent, request_id)
            ctx.access_log.log(record, held_bytes(record))

    # request bodies ------------------------------------------------------
    def body_chunks(self) -> Iterator[Piece]:
        """Body pieces (bytes or spans: `balancer.http11`) of the current request,
        reading the socket as needed."""
        events = self.events
        while True:
            while events:
                event = events.pop(0)
                if event is END:
                    return
                yield event
            self.arm(self.sock, self.ctx.timeouts.client_idle)
            try:
                data = self.stream.recv(RECV_SIZE)
            except TimeoutError:  # (bug: counted as 499, as if the client had left)
                raise ClientGone("no request body byte for client_idle", 408) from None
            except OSError as exc:
                raise ClientGone(str(exc)) from None
            if not data:
                raise ClientGone("client closed during the request body")
            try:
                self.parser.feed(data)
            except ProtocolError as exc:
                self.defer(exc)

    def defer(self, exc: ProtocolError) -> None:
        """A read brought a malformed request: if whole requests came before it,
        they are answered first (`broken` is raised once they were, and what came
        of the next request is dropped), else `exc` is raised now. (Bug: the
        error page went out at once, as if it answered the first request.)"""
        events = self.events
        complete = len(events)
        while complete and events[complete - 1] is not END:
            complete -= 1
        if not complete:
            raise exc
        for _ in range(len(events) - complete):
            events.pop()
        self.broken = exc

    def buffered_body(self) -> Piece | None:
        """The whole body if it already arrived with the head, else None (leaves it):
        its one piece as it came (bytes or a span of the head's read), or several
        joined."""
        events = self.events
        for count, event in enumerate(events):
            if event is END:
                pieces = events[:count]
                del events[:count + 1]
                return pieces[0] if count == 1 else join_pieces(pieces)
            if isinstance(event, RequestHead):
                break
        return None

    def discard_body(self, ex: Exchange) -> None:
        """Skip an unused request body, or give up keep-alive if it is too large
        (a Content-Length over DRAIN_LIMIT) or a chunked one not all here (it is
        not waited for: a stream's end may never come). Bug: a chunked body that
        came whole with its head closed the connection too, and the requests
        pipelined after it went unanswered."""
        if ex.body_done:
            return
        head = ex.head
        length = head.content_length
        if length is None and not head.expect_continue and self.buffered_body() is not None:
            ex.body_done = True  # (chunked, whole: dropped with its END)
            return
        if length is None or length > DRAIN_LIMIT or head.expect_continue:
            ex.keep_alive = False  # (the body stays unread: the connection lingers)
            return
        ex.body_done = True
        try:
            for _ in self.body_chunks():
                pass
        except (ClientGone, ProtocolError):
            ex.keep_alive = False


def is_challenge(target: bytes) -> bool:
    """Whether `target` is under ACME_PATH (an ACME HTTP-01 validation's)."""
    # "/." first (one byte read: bytes.startswith is a method call in mypyc)
    return len(target) > 1 and target[1] == DOT and target.startswith(ACME_PATH)


def _fields(raw: bytes) -> tuple[tuple[bytes, bytes], ...]:
    """``b"\r\nName: value"`` pieces as (name, value) pairs."""
    pairs = (line.split(b": ", 1) for line in raw.split(b"\r\n") if line)
    return tuple((name, value) for name, value in pairs)


def log_access(access_log: AccessLog, ex: Exchange, elapsed: float) -> None:
    """Queue the access log record of a finished exchange (balancer.accesslog field
    order) with the bytes of its request it keeps (`records.held_bytes`, summed here
    from the typed values: a few instructions)."""
    head = ex.head
    lower = head.block.translate(LOWER)  # (one copy for both searches)
    referer, agent = head.field(b"referer", lower), head.field(b"user-agent", lower)
    host, target, request_id = head.host, head.target, ex.request_id
    held = len(host) + len(target) + len(request_id)
    if referer is not None:
        held += len(referer)
    if agent is not None:
        held += len(agent)
    access_log.log((time.time() - elapsed, ex.conn.client_ip, host, head.method, target,
                    b"HTTP/" + head.version, ex.status, ex.sent, ex.received, referer, agent,
                    request_id, ex.backend or None, elapsed, ex.backend_time or None), held)


def handle_client(sock: socket.socket, address: Any, ctx: Context) -> bool:
    """Serve one accepted client connection until it closes (False) or is parked
    between requests (True: `resume_client` goes on with it)."""
    ctx.stats.open_connections += 1
    # TCP_NODELAY came with the socket: listeners have it (`balancer.accepting.bind`)
    conn = ClientConnection(sock, address, ctx)
    ctx.io.attach(conn)
    return run_client(conn)


def resume_client(conn: ClientConnection) -> bool:
    """Go on serving a parked connection, now readable (as `handle_client`)."""
    conn.io.attach(conn)
    return run_client(conn)


def expire_client(conn: ClientConnection) -> bool:
    """Close a parked connection whose client_idle passed (or that a drain ends),
    or one the hub answered and closes (`GeventIO.close_parked`): it lingers if
    its client may still be sending (`linger`), as `run_client`'s would."""
    conn.io.attach(conn)
    if conn.linger == LINGER and linger(conn):
        return True
    end_client(conn)
    return False


def run_client(conn: ClientConnection) -> bool:
    """Serve `conn` until it closes (ended here) or parks. (No try/finally: mypyc's
    is a bigger C frame, and this one is saved with every waiting greenlet.)"""
    try:
        parked = conn.serve() or (conn.linger == LINGER and linger(conn))
    except OSError:
        parked = False
    except BaseException:
        end_client(conn)
        raise
    if not parked:
        end_client(conn)
    return parked


def linger(conn: ClientConnection) -> bool:
    """Let `conn`, answered, linger before it closes (`balancer.lingering`):
    whether it does (it is parked: `end_client` closes it later)."""
    lingering = conn.ctx.lingering
    if lingering is None or not lingering.start(conn):
        conn.linger = CLOSE
        return False
    conn.linger = LINGERING
    return True


def end_client(conn: ClientConnection) -> None:
    if conn.linger == LINGERING:
        conn.ctx.stats.lingering_connections -= 1
    conn.close()
    conn.ctx.stats.open_connections -= 1
    conn.io.detach(conn)
