"""Requests served in the hub, with no greenlet switch (gevent only).

A keep-alive connection waiting for its next request is parked
(`balancer.netio.GeventIO.park`): no greenlet waits for it, and so is a new
plain connection waiting for its first (`balancer.connection.Context.start`,
from the accept). When it becomes readable, `serve_ready` runs in the hub,
from the readiness callback (for a new connection `serve_new` reads at once,
from the accept: a client sends its request right after the handshake), and
serves the common case there: one whole bodyless head, nothing after it,
routed to a plain `proxy` rule with no limits, a pooled idle connection to
the picked backend, or else a new one the hub opens itself (`_connect`: the
steps of `Backend.connect`, `start_connect` and `end_connect`, with the
connect's end awaited in the loop, `connect_ready`, within the backend's
connect timeout). A request that closes its connection (`Connection:
close`, HTTP/1.0, a draining worker's) is such a case too: after its answer
the connection is closed in the hub (`_close`) if it does not linger and
the answer went in one send, else by a greenlet (`GeventIO.close_parked`).
A client's EOF or reset on a parked connection closes it in the hub.

`_serve` parses and routes the head, sends the request on that connection
(held for the outbox, as a greenlet's last write is) and parks the backend
connection's readiness in turn (`backend_ready`). When the backend answers
with a whole fixed-length response, that is relayed (held for the outbox),
the connection goes back to its pool, the exchange is counted and logged,
and the client connection is parked again (or closed).
Waiting in a greenlet instead cost four switches per request (the wait for
the client's next request and for the backend's answer, each out and back
in), ~4,300 instructions of ~34,500 (docs/performance.md).

Every step calls the functions the greenlet path calls
(`ClientConnection.take`, `begin`, `finish`, `conclude` and `park`;
`ProxyAction.first_try` and `landed`; `balancer.relay.dispatch`,
`take_ready`, `deliver` and `land`): there is one implementation of the
proxy, and this module only decides, at each step, whether the hub may go
on.

Invariants:
* Nothing here waits. Writes are only held (`balancer.outbox`), and only
  when they fit the writer's hold (`_can_hold`: no send in progress, within
  HOLD_LIMIT), or, before a close, made with one non-blocking send; reads
  are made only after a readiness (or an accept), and find nothing at worst
  (the connection parks again).
* A connection closed here frees its slot (`GeventIO.on_closed`, the
  worker's `Slots.leave`) and its counters (`end_client`) once, as a
  greenlet's handler returning False does; one that lingers is a greenlet's.
* A new connection's first request is served exactly as a parked
  connection's next: the same deadline (client_idle, `idle`, until a byte
  comes; then client_header from that byte, in the greenlet it is handed
  to), the same hand-offs.
* Any other case, at any step, hands the connection to a greenlet
  (`GeventIO.hand_off`), which goes on from exactly that state with the normal
  code (`ClientConnection.serve`): bytes read are in the parser (a partial
  head keeps its `head_due`, a malformed one is `broken`), a request head
  taken is an `exchange` in flight (`ClientConnection.proceed`), a try begun
  on a backend is its `Exchange.flight` (`balancer.relay.arrive`: a
  connection still to take, a connect still in progress (`Flight.connecting`:
  the greenlet waits until its connect timeout), a request still to send, or
  an answer to read, with what the hub's connect or read raised in
  `Flight.error`, raised once where the greenlet's own step would have, so
  a failed connect is counted once and retried or answered 502 once). So
  every uncommon case (a body, a split or pipelined head, a closing or
  HTTP/1.0 request, an upgrade, a limit or another action, a connect refused
  or timed out or out of descriptors, a backend named by a host name, a
  pooled connection the backend closed or answered 408 on (the normal retry,
  `balancer.relay.STALE`), a partial, interim,
  chunked or large response, a client whose writes are behind, an
  `https://` backend) runs the greenlet path's code.
* A TLS client (`_serve_tls`) is read once through OpenSSL, non-blocking,
  and only while none of its writes is in progress: no decrypted byte (half
  a record, a record with no data) leaves it parked (closed past its
  deadline, which the watchdog left to the readiness); an SSL error or the end
  of its stream closes it (`_close`: through a greenlet, `close_parked`), as
  the greenlet's read would; a read that wants a write (SSLWantWrite: the
  greenlet waits for the socket to be writable and reads again) and a
  read after which OpenSSL still holds decrypted bytes (kept in
  `TLSStream.held`: no readiness would announce the rest) go to the
  greenlet. Its answer is held in plaintext and encrypted by the outbox
  (`balancer.outbox.TLSWriter`), which gives a write the socket cannot take
  whole, or that OpenSSL can make only after a read (SSLWantRead), to a
  greenlet that retries the same bytes. A new TLS connection's first
  request is a greenlet's, after its handshake.
* A request in flight here has no task: its deadline is the connection's as
  always; when the watchdog finds it passed, `overdue` stops the backend
  wait (or the connect's: a greenlet waits for the rest of it) and the
  worker hands it to a greenlet, which waits again and gets the watchdog's
  TimeoutError there (`GeventIO._expire_parked`): a connect's wait makes it
  a `ConnectOverdue` (504, not the backend's failure), as the greenlet
  path's own connect does.
* A bug raised in these steps (`_fault`) ends the request as the greenlet
  path ends a failed one: a try on a taken backend connection fails
  (`HubFault`: a 502, the connection closed), a request not tried yet is
  served by the greenlet; what `finish`, `landed` and `land` release is
  released once (`ProxyAction.landed` releases a try's counts whatever raises
  in it; a fault after it finishes the exchange and closes the connection).
  The connection is closed only when the hand-off fails.
* A connection parked again here keeps its repeated head
  (`RequestParser.repeat_head`) unless the worker is crowded; the watchdog
  makes it forget it once idle for PARK_AFTER, as it parks a greenlet's.
"""

from __future__ import annotations

import logging
import time
from errno import EINPROGRESS
from ssl import SSLWantWriteError
from typing import Any, Final

from balancer.actions.proxy import ProxyAction
from balancer.connection import (
    CLOSE,
    RECV_SIZE,
    ClientConnection,
    Exchange,
    end_client,
    is_challenge,
)
from balancer.errors import ConnectError, HubFault, ProxyError, SelfLoop
from balancer.http11 import ProtocolError
from balancer.netio import CLOCK, EventedStream, TLSStream
from balancer.outbox import HOLD_LIMIT, Writer
from balancer.pool import Upstream
from balancer.relay import Flight, arm_connect, arm_head, deliver, dispatch, take_ready
from balancer.response_parser import ResponseHead

log: Final = logging.getLogger("balancer.inline")
# bytes of a read whose request the hub serves: the head sent on is at most about
# twice as long (Host again in X-Forwarded-Host, the balancer's fields), so it is
# always held whole
HEAD_MAX: Final = 16384
MARGIN: Final = 256  # bytes a response head may grow by on its way (request id, Connection)


def serve_ready(conn: ClientConnection) -> bool:
    """`GeventIO.serve_ready`: parked `conn` is readable (in the hub). False: a
    greenlet goes on as before (a send of it is in progress); True: the request
    is served here, or on its way here, or handed to a greenlet from where it
    stopped; or nothing came after all (parked again), or the client closed
    or reset the connection (closed, as its greenlet would: nothing to answer).
    A TLS connection's readiness is read through OpenSSL (`_serve_tls`)."""
    stream = conn.stream
    if not isinstance(stream, EventedStream):
        return isinstance(stream, TLSStream) and _serve_tls(conn, stream)
    if not _can_hold(stream.writer, 0):
        return False
    _arrive(conn, stream)
    return True


def serve_new(conn: ClientConnection) -> None:
    """`GeventIO.serve_new`: `conn` was just accepted (in the hub; open, idle, no
    task): its first request is served as `serve_ready` serves a parked
    connection's next, if it is there already (a client sends it right after
    its handshake); else it is parked until it comes."""
    stream = conn.stream
    assert isinstance(stream, EventedStream)  # a plain listener's (`Context.start`)
    _arrive(conn, stream)


def _arrive(conn: ClientConnection, stream: EventedStream) -> None:
    """Read what `conn`, which waits for a request with no task, sent: serve it,
    park on if nothing came, close on EOF or an error (what `read_head` ends on)."""
    try:
        data = stream.read_ready(RECV_SIZE)
    except OSError:
        data = b""  # a reset: gone
    if data is None:  # nothing yet
        conn.io.park(conn)
        return
    if not data:
        _close(conn)
        return
    try:
        _serve(conn, data)
    except Exception:  # noqa: BLE001 - a bug here must not leave the connection stuck
        _fault(conn)


def _serve_tls(conn: ClientConnection, stream: TLSStream) -> bool:
    """`serve_ready` of a parked TLS connection: one non-blocking read through
    OpenSSL. Nothing decrypted (half a record, or a record that is no data: a
    key update) leaves it parked, or closes it if its deadline passed (the
    watchdog leaves that to a readiness while bytes wait: `netio.has_come`); an
    error or the end of its stream (close_notify, a TCP end) closes it as the
    greenlet's read would; a read OpenSSL cannot make without a write
    (SSLWantWrite), a held write still going out, or decrypted bytes left in
    OpenSSL go to the greenlet, which reads as before."""
    if not _can_hold(stream.writer, 0):
        return False
    try:
        data = stream.read_ready(RECV_SIZE)
    except SSLWantWriteError:
        return False  # the greenlet's read, as before (`TLSStream.recv` waits until the
        # socket takes OpenSSL's write, then reads again)
    except OSError:  # SSLError included: a bad record, an alert, a reset
        data = b""  # what the greenlet's `read_head` ends on
    if data is None:  # nothing for the parser: a readiness will come for the rest
        if conn.deadline < time.monotonic():  # left to this readiness (`netio.has_come`):
            conn.io.close_parked(conn)  # closed as the watchdog would, else a client
            return True  # sending records with no data all along stays open
        return conn.io.park(conn)  # (False never: nothing was decrypted)
    if not data:
        _close(conn)
        return True
    if stream.obj.pending():  # more decrypted than one read takes: no readiness
        stream.held = data  # would announce the rest; the greenlet reads it all
        return False
    try:
        _serve(conn, data)
    except Exception:  # noqa: BLE001 - a bug here must not leave the connection stuck
        _fault(conn)
    return True


def _serve(conn: ClientConnection, data: bytes) -> None:
    """Take the request `data` brings and send it to a backend, or hand over."""
    io: Any = conn.io
    try:
        head = conn.take(data)
    except ProtocolError as exc:
        # raised by the greenlet's `read_head`: answered, closed. No complete request
        # came before it (`defer`), but the head of the one it broke may have (a
        # chunked body's bad framing): dropped, never served (bug: it was)
        conn.events.clear()
        conn.broken = exc
        io.hand_off(conn)
        return
    if head is None:  # part of a head
        io.hand_off(conn)
        return
    ex = conn.begin(head)
    action = ex.route.action
    if conn.events or len(data) > HEAD_MAX or not serves(ex) \
            or not isinstance(action, ProxyAction):
        io.hand_off(conn)
        return
    flight = ex.flight = action.first_try(ex)
    if flight is None or not _depart(ex, flight):
        io.hand_off(conn)


def servable(ex: Exchange) -> bool:
    """Whether the hub serves a request like `ex`'s (`GeventIO.servable`: after
    one, a connection parks at once; after others it waits for its next
    request in its greenlet, as a park, a wake and a hand-off per request would
    cost more than the switches saved): a keep-alive request with no body and
    no upgrade on a plain or TLS connection, for a plain `proxy` rule with no
    limits."""
    return ex.keep_alive and serves(ex)


def serves(ex: Exchange) -> bool:
    """Whether the hub serves `ex`'s request: `servable` but for keep-alive (a
    request that closes its connection, `Connection: close` or HTTP/1.0 or a
    draining worker's, is served here too: the connection is closed after it,
    `_close`)."""
    head, route, stream = ex.head, ex.route, ex.conn.stream
    # two checks written out (each an exact type compare under mypyc): with a helper
    # function instead, bench_hotpath counted ~110 more instructions per request
    return (not head.has_body and not head.upgrade
            and route.limit is None and isinstance(route.action, ProxyAction)
            and (isinstance(stream, EventedStream) or isinstance(stream, TLSStream))  # noqa: SIM101
            and not is_challenge(head.target))


def _depart(ex: Exchange, flight: Flight) -> bool:
    """Send the request on an idle pooled connection of the picked backend, or
    on a new one (`_connect`), and wait for its answer here; False: the
    greenlet goes on with `flight`."""
    backend = flight.backend
    if backend.tls is not None:
        return False
    now = CLOCK()  # (the pool's check of an idle connection's age, and the try's start)
    upstream = backend.acquire_idle(now)
    if upstream is None:
        return _connect(ex, flight)
    flight.board(upstream, True, now)
    return _send(ex, flight, upstream)


def _connect(ex: Exchange, flight: Flight) -> bool:
    """Open a new connection to the picked backend as `Backend.connect` does,
    cut at its steps: begun here (`start_connect`), its end awaited in the
    loop (`connect_ready`) within the backend's connect timeout, the client
    connection's deadline armed to its bound first (`arm_connect`). A backend
    named by a host name (resolved in a greenlet) is the greenlet's; a failed
    connect is the greenlet's to count and retry (`Flight.error`: False)."""
    backend = flight.backend
    if not backend.is_literal:
        return False
    arm_connect(ex, backend)  # as the greenlet's `_take` does
    try:
        sock, err = backend.start_connect()
    except ConnectError as exc:
        flight.error = exc
        return False
    if err != EINPROGRESS:  # connected, or refused, at once
        return _connected(ex, flight, sock, err)
    io: Any = backend.io  # the worker's `GeventIO` (a TLS client's `conn.io` is a `TLSIO`)
    flight.connecting = io.await_connect(sock, backend.connect_timeout, connect_ready, ex.conn)
    return True


def connect_ready(conn: ClientConnection, err: int) -> None:
    """The connect of the request `conn` waits for ended with `err` (in the hub,
    `balancer.netio.Connecting`): send the request on it, or hand over."""
    try:
        ex = conn.exchange
        assert ex is not None  # `_serve` began it
        flight: Flight = ex.flight
        connecting = flight.connecting
        assert connecting is not None  # `_connect` began it
        flight.connecting = None
        if not _connected(ex, flight, connecting.sock, err):
            io: Any = conn.io
            io.hand_off(conn)
    except Exception:  # noqa: BLE001 - a bug here must not leave the connection stuck
        _fault(conn)


def _connected(ex: Exchange, flight: Flight, sock: Any, err: int) -> bool:
    """The new connection's connect ended with `err`: send the request on it
    (`_send`); False: a greenlet goes on (with `Flight.error`, the connect's
    ConnectError, if it failed, or SelfLoop: it reached this balancer)."""
    try:
        upstream = flight.backend.end_connect(sock, err)
    except (ConnectError, SelfLoop) as exc:
        flight.error = exc
        return False
    flight.board(upstream, False)
    return _send(ex, flight, upstream)


def _send(ex: Exchange, flight: Flight, upstream: Upstream) -> bool:
    """Send the request on `upstream`, taken for `flight`, and wait for its
    answer here (`backend_ready`); False: the greenlet goes on with `flight`."""
    stream = upstream.stream
    if not isinstance(stream, EventedStream) or not _can_hold(stream.writer, HEAD_MAX * 2):
        return False
    try:
        dispatch(ex, upstream, None, None)
    except ProxyError as exc:
        flight.sent = True
        flight.error = exc  # `arrive` raises it where the read of the answer would
        return False
    flight.sent = True
    stream.watcher.park(backend_ready, ex.conn)
    return True


def backend_ready(conn: ClientConnection) -> None:
    """The backend connection of the request `conn` waits for is readable (in
    the hub): relay a whole answer and park the client again, or hand over."""
    try:
        _land(conn)
    except Exception:  # noqa: BLE001 - a bug here must not leave the connection stuck
        _fault(conn)


def _land(conn: ClientConnection) -> None:
    ex = conn.exchange
    assert ex is not None  # `_serve` began it
    flight: Flight = ex.flight
    upstream = flight.upstream
    assert upstream is not None  # `_depart` took it
    io: Any = conn.io
    stream: Any = upstream.stream
    try:
        if not take_ready(upstream):  # nothing after all: wait on
            stream.watcher.park(backend_ready, conn)
            return
    except ProxyError as exc:
        flight.error = exc  # `arrive` raises it where its read would
        io.hand_off(conn)
        return
    parser = upstream.parser
    assert parser is not None  # `dispatch` began it
    events = parser.events
    rhead = events[0] if parser.complete and events else None
    client = conn.stream
    if (not isinstance(rhead, ResponseHead) or rhead.status < 200 or rhead.status == 101
            or (rhead.status == 408 and flight.reused)  # `relay.STALE`: the greenlet replays
            or (rhead.content_length is None and not rhead.no_body)
            or not (isinstance(client, EventedStream) or isinstance(client, TLSStream))  # noqa: SIM101
            or not _can_hold(client.writer, _size(ex, rhead))):
        if not events:  # a head in pieces: its next read within backend_read of this one
            arm_head(conn, upstream, parser)
        io.hand_off(conn)
        return
    # one reading of the clock for the answer's steps, none of which waits (the
    # answer came whole and the client's writer holds it, `_can_hold`): the try's
    # end, the connection's idle start, the request's end (a few µs early: its
    # head built and held after it)
    now = CLOCK()
    deliver(ex, flight, upstream, rhead, 1, now)  # (the head left first in `events`)
    ex.flight = None  # (after `deliver`: a fault before this point fails the try, `_fault`)
    ProxyAction.landed(ex, flight, now)  # (what the try holds is released there, once)
    conn.finish(ex, now)
    if not conn.conclude(ex):
        _close(conn)
    elif not conn.park(conn.io.is_crowded()):
        io.hand_off(conn)


def _close(conn: ClientConnection) -> None:
    """Close `conn`, which has no task (its last answer closes it, or its client
    closed): here if nothing is left to wait for, that is, it does not linger
    and what is held of its answer went at once (one send, as the outbox's);
    else a greenlet closes it (`GeventIO.close_parked`: `expire_client` sends
    the rest and lingers, as `run_client` would)."""
    stream = conn.stream
    if conn.linger == CLOSE and isinstance(stream, EventedStream):
        writer = stream.writer
        if writer.rest is None:
            writer.flush()  # a failed send is dropped: the client is gone
            if writer.rest is None:
                end_client(conn)
                io: Any = conn.io
                io.on_closed()
                return
    conn.io.close_parked(conn)


def overdue(conn: ClientConnection) -> bool:
    """`GeventIO.on_overdue`: the deadline of `conn`, whose request waits here for
    its backend's answer, passed (in the hub). Stop that wait (the worker hands
    the connection to a greenlet, which waits again and gets the TimeoutError);
    whether there was one."""
    ex = conn.exchange
    if ex is None:
        return False
    flight = ex.flight
    if flight is None:
        return False
    connecting = flight.connecting
    if connecting is not None:  # a greenlet waits for the rest of the connect
        return connecting.stop()
    if flight.upstream is None:
        return False
    stream: Any = flight.upstream.stream
    return bool(stream.watcher.unpark())


def _size(ex: Exchange, rhead: ResponseHead) -> int:
    """At most how many bytes the client gets for the whole answer `rhead`."""
    return (len(rhead.status_line) + len(rhead.forwarded) + len(ex.head_extra)
            + len(ex.request_id) + (rhead.content_length or 0) + MARGIN)


def _can_hold(writer: Writer, size: int) -> bool:
    """Whether a held write of `size` more bytes is only held (never waits)."""
    return writer.rest is None and writer.held_size() + size <= HOLD_LIMIT


def _fault(conn: ClientConnection) -> None:
    """A bug: log it and end the request as the greenlet path ends a failed one,
    so that what its steps opened is released once (`ClientConnection.finish`,
    `ProxyAction.attempt`, `balancer.relay.arrive`). A try on a taken backend
    connection fails with HubFault (502, or closed if the answer began; the
    connection closed, not counted against the backend); one before that, or a
    request not yet tried, is served by the greenlet from where it is. Closed
    only when nothing is in flight or the hand-off itself fails."""
    log.exception("serving a request in the hub failed; a greenlet ends it")
    io: Any = conn.io
    ex = conn.exchange
    try:
        if ex is not None:
            flight = ex.flight
            if flight is not None and flight.connecting is not None:
                flight.connecting.stop()  # a greenlet waits for the rest of the connect
            elif flight is not None and flight.upstream is not None:
                flight.upstream.stream.watcher.unpark()  # its readiness is not awaited
                flight.error = HubFault()  # raised by `arrive` where its read would be
            elif flight is None and ex.started:  # after its answer (`land`, `landed`)
                ex.keep_alive = False
                conn.finish(ex)
                io.close_parked(conn)
                return
            io.hand_off(conn)
            return
    except Exception:  # noqa: BLE001 - closed below
        log.exception("handing a failed request to a greenlet failed; closing it")
    io.close_parked(conn)

