"""Keep-alive requests served in the hub, with no greenlet switch (gevent only).

A keep-alive connection waiting for its next request is parked
(`balancer.netio.GeventIO.park`): no greenlet waits for it. When it becomes
readable, `serve_ready` runs in the hub, from the readiness callback, and
serves the common case there: one whole bodyless keep-alive head, nothing
after it, routed to a plain `proxy` rule with no limits, a pooled idle
connection to the picked backend. It parses and routes the head, sends the
request on that connection (held for the outbox, as a greenlet's last write
is) and parks the backend connection's readiness in turn (`backend_ready`).
When the backend answers with a whole fixed-length response, that is
relayed (held for the outbox), the connection goes back to its pool, the
exchange is counted and logged, and the client connection is parked again.
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
  HOLD_LIMIT); reads are made only after a readiness, and find nothing at
  worst.
* Any other case, at any step, hands the connection to a greenlet
  (`GeventIO.hand_off`), which goes on from exactly that state with the normal
  code (`ClientConnection.serve`): bytes read are in the parser (a partial
  head keeps its `head_due`, a malformed one is `broken`), a request head
  taken is an `exchange` in flight (`ClientConnection.proceed`), a try begun
  on a backend is its `Exchange.flight` (`balancer.relay.arrive`: a
  connection still to take, a request still to send, or an answer to read,
  with what its read raised in `Flight.error`). So every uncommon case
  (a body, a split or pipelined head, a closing or HTTP/1.0 request, an
  upgrade, a limit or another action, no idle pooled connection, a pooled
  connection the backend closed (the normal retry), a partial, interim,
  chunked or large response, a client whose writes are behind, TLS) runs
  the greenlet path's code.
* A request in flight here has no task: its deadline is the connection's as
  always; when the watchdog finds it passed, `overdue` stops the backend
  wait and the worker hands it to a greenlet, which waits again and gets the
  watchdog's TimeoutError there (`GeventIO._expire_parked`).
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
from typing import Any, Final

from balancer.actions.proxy import ProxyAction
from balancer.connection import RECV_SIZE, ClientConnection, Exchange, is_challenge
from balancer.errors import HubFault, ProxyError
from balancer.http11 import ProtocolError
from balancer.netio import EventedStream
from balancer.outbox import HOLD_LIMIT, Writer
from balancer.relay import Flight, deliver, dispatch, take_ready
from balancer.response_parser import ResponseHead

log: Final = logging.getLogger("balancer.inline")
# bytes of a read whose request the hub serves: the head sent on is at most about
# twice as long (Host again in X-Forwarded-Host, the balancer's fields), so it is
# always held whole
HEAD_MAX: Final = 16384
MARGIN: Final = 256  # bytes a response head may grow by on its way (request id, Connection)


def serve_ready(conn: ClientConnection) -> bool:
    """`GeventIO.serve_ready`: parked `conn` is readable (in the hub). False:
    nothing was read, a greenlet goes on as before; True: the request is served
    here, or on its way here, or handed to a greenlet from where it stopped."""
    stream = conn.stream
    if not isinstance(stream, EventedStream) or not _can_hold(stream.writer, 0):
        return False
    try:
        data = stream.read_ready(RECV_SIZE)
    except OSError:
        return False  # the greenlet's read finds the connection closed
    if not data:
        return False  # nothing yet, or the client closed: the greenlet sees it too
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
        conn.broken = exc  # raised by the greenlet's `read_head`: answered, closed
        io.hand_off(conn)
        return
    if head is None:  # part of a head
        io.hand_off(conn)
        return
    ex = conn.begin(head)
    action = ex.route.action
    if len(conn.events) != 1 or len(data) > HEAD_MAX or not servable(ex) \
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
    no upgrade on a plain connection, for a plain `proxy` rule with no limits."""
    head, route = ex.head, ex.route
    return (ex.keep_alive and not head.has_body and not head.upgrade
            and route.limit is None and isinstance(route.action, ProxyAction)
            and isinstance(ex.conn.stream, EventedStream) and not is_challenge(head.target))


def _depart(ex: Exchange, flight: Flight) -> bool:
    """Send the request on an idle pooled connection of the picked backend and
    wait for its answer here; False: the greenlet goes on with `flight`."""
    backend = flight.backend
    if backend.tls is not None:
        return False
    upstream = backend.acquire_idle()
    if upstream is None:
        return False
    flight.board(upstream, True)
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
            or (rhead.content_length is None and not rhead.no_body)
            or not isinstance(client, EventedStream)
            or not _can_hold(client.writer, _size(ex, rhead))):
        io.hand_off(conn)
        return
    events.pop(0)
    deliver(ex, flight, upstream, rhead)
    ex.flight = None  # (after `deliver`: a fault before this point fails the try, `_fault`)
    ProxyAction.landed(ex, flight)  # (what the try holds is released there, once)
    conn.finish(ex)
    if not conn.conclude(ex):
        io.close_parked(conn)
    elif not conn.park(conn.io.is_crowded()):
        io.hand_off(conn)


def overdue(conn: ClientConnection) -> bool:
    """`GeventIO.on_overdue`: the deadline of `conn`, whose request waits here for
    its backend's answer, passed (in the hub). Stop that wait (the worker hands
    the connection to a greenlet, which waits again and gets the TimeoutError);
    whether there was one."""
    ex = conn.exchange
    if ex is None:
        return False
    flight = ex.flight
    if flight is None or flight.upstream is None:
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
            if flight is not None and flight.upstream is not None:
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

