"""The I/O seam: how one worker waits and moves bytes, chosen once per worker.

As httpcore passes a network backend to its connections, a worker passes one
`IO` object to everything that touches a socket (the client connection, the
backend pools, the relay, held requests), and they never ask which it is:

* `GeventIO` (every worker of `balancer serve`): gevent's sockets. A
  connection's waits are bounded by a deadline the worker's watchdog enforces
  (`arm` returns it, `expire` throws TimeoutError, `balancer.errors.Overdue`,
  into the overdue greenlet); plain sockets become `EventedStream`s, which
  read and write the OS socket under gevent's, wait for readability on a
  `balancer.readiness.Readable` and hold a greenlet's last write for the
  loop's `balancer.outbox.Outbox`; a relay that never has to wait yields its
  turn (`balancer.turns`).
* `IO` itself (the threaded baseline, `loadtest.threaded`, and
  scripts/bench_hotpath.py): blocking sockets, each wait bounded by the
  socket's timeout; plain `Stream`s.

A `Stream` is one socket as the proxy uses it. The plain `Stream` needs only
the socket API (`recv`, `sendall`, `close`), so any socket-like object plugs
in as one: a TLS socket is such an object (gevent's SSLSocket waits
cooperatively in its own `recv` and `sendall`), while the `EventedStream`
fast path, which reads and writes the file descriptor itself, is for plain
sockets only, since an encrypted socket's bytes must go through its SSL object.
A gevent worker's TLS sockets (its TLS listeners' clients through `TLSIO`,
its `https://` backends' connections: `tls_stream`) are `TLSStream`s: reads
and writes go to the SSL object, waits to the socket's `Readable`, and a
response's last write is held for the outbox as a plain socket's is.

Invariants:
* A worker has exactly one `IO`; every stream of the worker comes from it.
* Whoever owns a stream closes it (`close`): its socket, readiness watcher
  and held writes go with it.
* Under gevent a keep-alive client connection waiting for its next request
  is `park`ed: no greenlet (and no greenlet stack) is kept for it; its
  readiness is first offered to the hub (`serve_ready`, `balancer.inline`),
  which serves the common request itself or hands the connection to a
  greenlet (`hand_off`) from where it stopped; its deadline hands it to a
  greenlet too (`on_expire`, or for a request the hub serves `on_overdue`
  and then a TimeoutError in the greenlet). It still counts as open
  (`connections`), and its deadline is enforced as any other's. A TLS
  connection is parked only while OpenSSL holds no decrypted byte, which no
  readiness would announce (`Stream.can_park`); the hub reads its readiness
  through OpenSSL (`TLSStream.read_ready`) and serves it as a plain one.
* Events before timers: a parked connection whose deadline passed while bytes
  or EOF wait on its socket is left to its readiness (`has_come`), which sees
  to it with the clock as it is then (after a stall the watchdog's tick can
  run first).
* A new plain client connection starts parked (`start`, from the accept, in
  the hub): waiting for its first request is waiting for a keep-alive one's
  next (`idle`, within client_idle), and that request goes to the hub first
  too (`serve_new`, then `serve_ready`). A TLS connection starts in a greenlet
  (its handshake).
* A held client (`wait_any`) is watched while it can be: a readiness is
  judged by the stream (`has_sent_more`): a plain socket is peeked at, a TLS
  one read through OpenSSL (its readiness may be no request byte), and what
  that read is kept for the next reader (`unread`).
* An idle pooled connection is `park`ed; `is_clean` is then False as soon as
  anything (bytes or EOF) arrived on it, and such a connection is never used
  again (a backend's stray response or `408` would reach the next client).
  Under gevent the stream's readiness watcher notices it in the loop, with no
  syscall per request; a blocking stream asks with one `poll`. A readiness
  is not trusted alone: one may come from before the connection went idle
  (the relay read the bytes without waiting for it), so a stirred stream's
  socket is peeked at (`nothing_came`) and only bytes or EOF make it unclean.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
import weakref
from _socket import SO_ERROR, SOCK_STREAM, SOL_SOCKET
from _socket import socket as RawSocket
from collections.abc import Callable, Sequence
from errno import EINPROGRESS
from ssl import SSLWantReadError, SSLWantWriteError, SSLZeroReturnError
from typing import TYPE_CHECKING, Any, Final, cast

from gevent import Timeout, get_hub, getcurrent
from gevent.socket import socket as GeventSocket

from balancer.errors import ClientGone, Overdue, RenegotiationRefused
from balancer.evgil import hold_gil
from balancer.hangups import HANG_UP_AFTER, HangUps
from balancer.outbox import WRITE, Outbox, TLSWriter, Writer
from balancer.peek import CLOSED, OPEN, READABLE, peek, peek_under
from balancer.readiness import READ, SWITCH, Readable
from balancer.sockcalls import NOTHING, peek_now, recv_now
from balancer.spans import Span, span_joined
from balancer.turns import Turn

if TYPE_CHECKING:
    from balancer.connection import ClientConnection

NEVER: Final = float("inf")
# the deadline of a connection the watchdog found past it, from its `expire` until
# the Overdue is thrown (`_time_out`, `_expire_parked`): never due again, as NEVER,
# and told apart from any deadline armed meanwhile (`ClientConnection.arm`,
# `disarm`), which makes that throw stale: it is dropped (bug: after a stall, the
# watchdog's tick and a connect's timeout came in one loop iteration, the tick
# first; the timeout's retry, armed anew, got the Overdue queued before it: a 504)
EXPIRED: Final = 1.7e308
# The data plane's clock, time.monotonic held in a static (``time.monotonic()``
# looks the function up on the module by name): a request's times, a try's, an
# idle pooled connection's, and what they are compared with. ~200 instructions
# a read: the hub reads it once where several steps happen together
# (`balancer.inline`: `_depart`, `_land`).
CLOCK: Final[Callable[[], float]] = time.monotonic
HELD_READ: Final = 65536  # bytes a held TLS client's readiness reads through OpenSSL
# the owners (the ssl module's socket, or gevent's stand-in for it) of the SSL
# objects of backend connections whose renegotiation `balancer.backend_tls._watch`
# refused, their reading shut: the end of their stream says why (`TLSStream.ended`)
REFUSED: Final[weakref.WeakSet[Any]] = weakref.WeakSet()
# seconds (at most half of client_idle) a keep-alive connection waits for its
# next request in its own greenlet before the watchdog parks it (no greenlet,
# `GeventIO.park`): parking between every two requests of a busy connection cost
# ~4k instructions per request (park, wake, resume), while a connection idle for
# long should not hold a greenlet's stack
PARK_AFTER: Final = 1.0
# past this many connections in a worker every connection parks as soon as it has
# answered, so that idle clients hold no greenlet stack (4.9 KB instead of 13.9 KB
# per idle connection); below it, as many greenlets cost ~16 MB at most
CROWDED: Final = 1024


class Stream:
    """A blocking socket (or any object with the socket API): every call is the
    socket's own, and waits in it."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.poller: Any = None  # select.poll of this socket alone, made by the first `park`

    def recv(self, size: int) -> bytes:
        """Up to `size` bytes (b"" at EOF); raises OSError, TimeoutError."""
        return self.sock.recv(size)

    def read_ready(self, size: object) -> bytes | None:
        """Up to `size` bytes (an int) if some are there now, else None (a blocking
        socket cannot tell without waiting: always None). `size` is passed on as
        the object it is: a caller's constant (`RECV_SIZE`) is a static object
        under mypyc, where a native int would be boxed for each read (65536 is no
        cached small int: an allocation and a free, ~85 instructions)."""
        return None

    def wait_readable(self) -> None:
        """Wait until a read would find data (a blocking read waits by itself)."""

    def wait_writable(self) -> None:
        """Wait until the socket takes a write: after a TLS read that OpenSSL can
        make only once a write of its own went out (`read_ready` raising
        SSLWantWrite; a blocking stream's never does: nothing to wait for)."""

    def write(self, data: bytes) -> None:
        """Send `data` now, after anything held. Raises OSError."""
        self.sock.sendall(data)

    def write_last(self, data: bytes) -> None:
        """Send `data` by the end of the loop iteration: the caller's next step
        is to wait for its peer (or to close, which sends what is held)."""
        self.sock.sendall(data)

    def write_span(self, head: bytes, span: Span) -> None:
        """`write` of `head` then `span`'s bytes (a blocking socket: joined)."""
        self.sock.sendall(span_joined(head, span))

    def write_last_span(self, head: bytes, span: Span) -> None:
        """`write_last` of `head` then `span`'s bytes."""
        self.sock.sendall(span_joined(head, span))

    def has_held(self) -> bool:
        """Whether bytes written with `write_last` are still to be sent."""
        return False

    def finish(self) -> None:
        """Send what is held, now. Raises OSError."""

    def has_sent_more(self) -> bool:
        """Asked of a held client's stream whose socket became readable: True if
        the client sent more (pipelining: it is not watched any further), False
        if nothing it sent can be read yet; raises ClientGone if it hung up."""
        state = peek(self.sock)
        if state == CLOSED:
            raise ClientGone("client closed while held")
        return state == READABLE

    def unread(self) -> bytes:
        """Bytes read from the socket that no reader has taken yet (b"": none)."""
        return b""

    def can_park(self) -> bool:
        """Whether its connection may wait parked for its next request: its next
        readiness would show everything it has to read (a blocking stream: no)."""
        return False

    def park(self) -> None:
        """The connection goes idle (into a pool): from now on nothing may arrive."""
        if self.poller is None:
            self.poller = select.poll()
            self.poller.register(self.sock.fileno(), select.POLLIN)

    def is_clean(self) -> bool:
        """Whether nothing arrived since `park` (no bytes, no EOF)."""
        return not self.poller.poll(0)  # one syscall, whatever the socket's timeout

    def is_untouched(self) -> bool:
        """Whether nothing came on this idle connection since its last read: no
        bytes, no end, no error (looked at now, without reading or waiting)."""
        return peek(self.sock) == OPEN

    def watch(self, judge: Callable[[], BaseException | bool]) -> None:
        """Until `unwatch`, while the calling greenlet does other things (a
        backend's stream while the request body goes out): at each readiness
        nobody reads, call `judge()` in the event loop, and throw the exception
        it returns into that greenlet (True: watch on; False: stop watching).
        A blocking stream cannot: nothing happens."""

    def unwatch(self) -> None:
        """Stop what `watch` started (a readiness then calls nothing)."""

    def on_stirred(self, callback: Callable[[], None]) -> None:
        """For the stream's whole life: call `callback()` in the event loop at
        each readiness nobody waits for or watches (a pooled connection's
        backend wrote or closed while it was idle, `park`). A blocking stream
        cannot: nothing happens (the pool's sweep finds it)."""

    def cooperative(self) -> Any:
        """The socket, for code that wants the whole socket API (the tunnel)."""
        return self.sock

    def close(self) -> None:
        """Close the socket (and whatever watches or writes it)."""
        self.sock.close()


class WatchedStream(Stream):
    """What the gevent worker's streams share (`EventedStream`, `TLSStream`):
    waits and parking on the socket's `Readable`, writes through a
    `balancer.outbox.Writer` (a `TLSWriter` for TLS: its `send` is the SSL
    object's); each closes all three."""

    def __init__(self, sock: Any, watcher: Readable, writer: Writer) -> None:
        super().__init__(sock)
        self.watcher = watcher
        self.writer = writer

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def write_last(self, data: bytes) -> None:
        self.writer.write_last(data)

    def write_span(self, head: bytes, span: Span) -> None:
        self.writer.write_span(head, span)

    def write_last_span(self, head: bytes, span: Span) -> None:
        self.writer.write_last_span(head, span)

    def has_held(self) -> bool:
        writer = self.writer
        return bool(writer.held) or writer.rest is not None

    def finish(self) -> None:
        self.writer.finish()

    def park(self) -> None:
        self.watcher.watch_idle()

    def watch(self, judge: Callable[[], BaseException | bool]) -> None:
        self.watcher.park(_judge_readiness, (self.watcher, judge, getcurrent()))

    def unwatch(self) -> None:
        self.watcher.unpark()

    def on_stirred(self, callback: Callable[[], None]) -> None:
        self.watcher.on_stir = callback

    def close(self) -> None:
        self.writer.close()
        self.watcher.close()
        self.sock.close()


class EventedStream(WatchedStream):
    """A socket read and written as the OS socket, waiting in gevent's loop.

    `sock` is gevent's socket (backend connections) or the OS socket itself,
    non-blocking (client connections accepted by `balancer.accepting.Listener`,
    which makes no gevent socket per connection: no Python-level wrapper to
    build and close, and no getsockname, ioctl and two fcntl calls for its
    two io watchers). gevent's ``recv`` and ``send`` are Python wrappers, a
    frame per call, and its ``recv`` tries first and waits after EAGAIN: on the
    proxy's hot reads (an answer right after a send) that try is a wasted
    syscall. So reads wait on the socket's `Readable` first where data is not
    expected yet (`wait_readable`) and read the OS socket (`balancer.sockcalls`:
    no exception when nothing is there); writes go through a `Writer` (held
    writes; a full buffer waits on the writer's own watcher)."""

    def __init__(self, sock: Any, watcher: Readable, outbox: Outbox) -> None:
        raw: Any = sock if isinstance(sock, RawSocket) else sock._sock  # non-blocking
        super().__init__(sock, watcher, Writer(raw, outbox))
        self.raw = raw

    def cooperative(self) -> Any:
        """The connection as gevent's socket (its blocking calls wait in the loop),
        for code that wants the socket API (the tunnel); made once, closed by
        `close`."""
        sock = self.sock
        if sock is self.raw:
            raw = sock
            sock = GeventSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
            self.sock = sock
            self.raw = self.writer.raw = sock._sock
        return sock

    def recv(self, size: int) -> bytes:
        while True:
            data = recv_now(self.raw, size)
            if data is not None:
                return data
            self.watcher.wait()

    def read_ready(self, size: object) -> bytes | None:
        return recv_now(self.raw, size)

    def wait_readable(self) -> None:
        self.watcher.wait()

    def can_park(self) -> bool:
        return True

    def is_clean(self) -> bool:
        watcher = self.watcher
        return watcher.is_quiet() or nothing_came(watcher, self.raw)

    def is_untouched(self) -> bool:
        # (one C call in a compiled build: `balancer.sockcalls`; gevent's recv with
        # MSG_PEEK, as `peek`, costs ~10,000 instructions: its wrapper, the timeout
        # set and restored, and the BlockingIOError of an open connection)
        return peek_now(self.raw) == NOTHING


def nothing_came(watcher: Readable, sock: Any) -> bool:
    """Whether an idle connection whose `watcher` saw a readiness is clean after
    all: its socket, peeked at without waiting, has neither bytes nor EOF (the
    readiness came from before it went idle: the relay read the bytes it
    announced without waiting for it, while its callback was still to come).
    If so it is watched afresh (`Readable.rewatch_idle`). Only a readiness
    costs the syscall: a quiet connection's `is_clean` makes none."""
    if watcher.closed or peek_under(sock) != OPEN:
        return False
    watcher.rewatch_idle()
    return True


def connect_blocking(family: int, address: tuple[Any, ...], timeout: float) -> Any:
    """The socket module's socket (gevent's once patched) connected to `address`
    within `timeout` seconds, with no timeout once connected (raises OSError,
    TimeoutError)."""
    sock = socket.socket(family, SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


def has_come(conn: Any) -> bool:
    """Whether bytes or EOF wait on the socket of `conn`, parked on it (not a
    request the hub waits for a backend for): its readiness, due now or at the
    next poll, sees to it with the clock as it is then. As nginx, events before
    timers: after a stall (a loaded machine) the watchdog's tick can come
    before the readiness polled with it, or in an iteration that polled none,
    and judge a deadline the client kept (bug: a lingering client that sent
    all along was cut as silent for `linger_idle` as soon as the worker ran
    again). One peek per passed deadline, none per tick."""
    return conn.stream.watcher.is_parked() and peek_under(conn.sock) != OPEN


def connect_outcome(sock: Any) -> int:
    """How the non-blocking connect of `sock` ended: 0 connected, an errno
    refused or failed, -1 still in progress. Asked when its timer fired: a loop
    stalled past the connect timeout (a loaded machine) runs the expired timer
    before the readiness polled in the same iteration (libev invokes the
    iteration's callbacks last queued first), so a connect made long ago was
    given up as timed out (bug: a ConnectError, so a 502 from a rule with one
    backend, and the backend saw a connection closed unused)."""
    err: int = sock.getsockopt(SOL_SOCKET, SO_ERROR)
    if err:
        return err
    try:
        sock.getpeername()
    except OSError:  # ENOTCONN: no outcome yet
        return -1
    return 0


def begin_connect(family: int, address: tuple[str, int]) -> tuple[Any, int]:
    """A connect's first step (`GeventIO.connect`; the hub's, `balancer.inline`):
    the OS socket, non-blocking, its connect to `address` begun, and how that
    went (`connect_ex`: 0 connected, EINPROGRESS, or an errno)."""
    sock = RawSocket(family, SOCK_STREAM)
    try:
        sock.setblocking(False)
        return sock, sock.connect_ex(address)
    except BaseException:
        sock.close()
        raise


def connect_ended(err: int) -> None:
    """A connect's last step: raise what its outcome `err` means (-1, as
    `connect_outcome`'s: still in progress at its timeout, TimeoutError; an
    errno: OSError); 0: connected."""
    if err < 0:
        raise TimeoutError("timed out")
    if err:
        raise OSError(err, os.strerror(err))


class Connecting:
    """A connect the hub waits for (`GeventIO.await_connect`): a write watcher
    and a timer in the loop, whichever fires first ends both and calls
    `then(arg, outcome)`. `stop` gives the wait up (the connect goes on, a
    greenlet waits for the rest: `GeventIO.complete_connect` until `by`)."""

    __slots__ = ("sock", "by", "watcher", "timer", "then", "arg")

    def __init__(self, loop: Any, sock: Any, timeout: float,
                 then: Callable[[Any, int], None], arg: Any) -> None:
        self.sock = sock
        self.by = time.monotonic() + timeout  # when the connect times out
        self.then = then
        self.arg = arg
        self.watcher: Any = loop.io(sock.fileno(), WRITE)
        self.timer: Any = loop.timer(timeout)
        self.watcher.start(self._ended, True)
        self.timer.start(self._ended, False, update=True)  # from now, as `wait_writable`

    def _ended(self, writable: bool) -> None:
        if self.stop():
            sock = self.sock
            err = sock.getsockopt(SOL_SOCKET, SO_ERROR) if writable else connect_outcome(sock)
            self.then(self.arg, err)

    def stop(self) -> bool:
        """Stop waiting; whether the wait was still on."""
        watcher = self.watcher
        if watcher is None:
            return False
        watcher.close()
        self.timer.close()
        self.watcher = self.timer = None
        return True


class ParkNow(Exception):
    """Thrown by the watchdog into a greenlet that has waited PARK_AFTER seconds
    for its connection's next request: the connection goes on parked (`GeventIO.park`)."""


class IO:
    """Blocking sockets (the threaded baseline): waits bounded by socket timeouts."""

    def stream(self, sock: Any) -> Stream:
        """The stream of a connected socket, for the socket's whole life."""
        return Stream(sock)

    def tls_stream(self, sock: Any) -> Stream:
        """The stream of a TLS socket whose handshake is done."""
        return Stream(sock)

    def connect(self, family: int, address: tuple[str, int], timeout: float) -> Any:
        """A TCP socket connected to `address` within `timeout` seconds, for
        `stream` (raises OSError, TimeoutError). Here the socket module's
        (blocking), with no timeout once connected: `arm` sets them."""
        return connect_blocking(family, address, timeout)

    def bounded(self, seconds: float) -> Any:
        """A context manager bounding what runs in it to `seconds` (TimeoutError);
        here the socket timeouts bound each wait: it does nothing more."""
        return contextlib.nullcontext()

    def arm(self, sock: Any, seconds: float) -> float:
        """Bound the next waits on `sock` to `seconds`; returns the deadline the
        watchdog enforces (NEVER: the socket's timeout does it here)."""
        sock.settimeout(seconds)
        return NEVER

    def arm_exactly(self, sock: Any, seconds: float) -> float:
        """`arm` from the clock as it is, not as of the watchdog's last tick: for a
        bound that another timer, started now, must come before
        (`balancer.relay.arm_connect`)."""
        return self.arm(sock, seconds)

    def turn(self) -> Turn:
        """A relay's `balancer.turns.Turn` (with no loop, it never parks)."""
        return Turn(None)

    def attach(self, conn: Any) -> None:
        """A client connection starts being served (by the calling thread)."""

    def detach(self, conn: Any) -> None:
        """The client connection is closed."""

    def park(self, conn: Any) -> bool:
        """Let the keep-alive connection `conn` wait for its next request with no
        task of its own; False: this IO cannot, the caller waits itself."""
        return False

    def is_crowded(self) -> bool:
        """Whether so many clients are connected that a connection should park as
        soon as it has answered (instead of after PARK_AFTER idle)."""
        return False

    def parks_at_once(self, ex: Any) -> bool:
        """Whether a client connection that has answered the exchange `ex` (and
        has nothing after it) should park at once: when the worker is crowded."""
        return self.is_crowded()

    def linger(self, conn: Any, on_ready: Callable[[Any], None], arg: Any) -> bool:
        """Keep the client connection `conn`, answered and half-closed, open with
        no task of its own: `on_ready(arg)` is called in the loop at its next
        readiness, and its deadline is enforced as a parked one's (`on_expire`
        closes it). False: this IO cannot (the caller closes it now)."""
        return False

    def close_parked(self, conn: Any) -> None:
        """Close `conn`, parked or lingering, from the loop (through `on_expire`)."""

    # the watchdog's steps (socket timeouts bound every wait: nothing to enforce)
    def tick(self) -> float:
        """Advance the clock deadlines are armed against; returns it."""
        return time.monotonic()

    def expire(self, now: float) -> None:
        """Raise TimeoutError in every connection whose deadline passed."""

    def close_idle(self, by: float) -> None:
        """Make every idle keep-alive connection time out (and close) by `by`."""

    def wait_any(self, events: Sequence[Any], stream: Stream, timeout: float,
                 watch_client: bool) -> bool:
        """Wait until one of `events` is set or `timeout` passes; returns whether
        to keep watching the client's `stream`. A blocking worker waits for
        the first event only (callers keep their own backoff for the others)
        and cannot watch the client."""
        events[0].wait(timeout)
        return False


class GeventIO(IO):
    """gevent's sockets in one hub: evented streams, one outbox, and the
    deadlines of every client connection (enforced by `expire`)."""

    def __init__(self) -> None:
        self.hub: Any = get_hub()
        self.outbox = Outbox(self.hub.loop)
        # its callbacks in one hold of the GIL per batch (False: one by one, as gevent's own)
        self.holds_gil = hold_gil(self.hub.loop)
        # runs (handler, args) in a greenlet (the worker's `balancer.serving.Slots.resume`);
        # None: connections are never parked
        self.resume: Any = None
        self.on_wake: Any = None  # handler of a parked connection's next request
        self.on_expire: Any = None  # handler of a parked connection that timed out
        # called in the hub, before `on_wake`, with a parked connection (plain or TLS)
        # that is readable: whether it served the request there, or left it parked or
        # closed (`balancer.inline`); False: `on_wake`; None: never
        self.serve_ready: Any = None
        # called in the hub with a connection whose request the hub serves and whose
        # deadline passed (`balancer.inline`)
        self.on_overdue: Any = None
        # called with a finished exchange: whether the hub would have served it
        self.servable: Any = None
        # called in the hub with a new plain connection (`start`): parks it or serves
        # its first request there (`balancer.inline`)
        self.serve_new: Any = None
        # told when a connection with no task is closed in the hub (the worker's
        # `balancer.serving.Slots.leave`: its slot frees)
        self.on_closed: Any = None
        # `_wake`, bound once: made anew at every park, it cost a method object
        self.wake: Callable[[ClientConnection], None] = self._wake
        # time.monotonic() as of the watchdog's last `tick`: deadlines are
        # enforced at tick granularity, so arming against it is as exact and
        # costs no call
        self.now = time.monotonic()
        self.connections: set[Any] = set()  # client connections being served
        self.hangups = HangUps()  # requests waiting on their backends, their clients watched

    def stream(self, sock: Any) -> Stream:
        return EventedStream(sock, Readable(sock), self.outbox)

    def tls_stream(self, sock: Any) -> Stream:
        return TLSStream(sock, Readable(sock), self.outbox)

    def connect(self, family: int, address: tuple[str, int], timeout: float) -> Any:
        """The OS socket, non-blocking, as clients' are (no gevent socket: no
        Python code runs in the greenlet, whose frame stack chunk and gevent's
        watchers, timeout and wrapper cost ~5 KiB per request in flight that
        opened a connection: docs/performance.md)."""
        sock, err = begin_connect(family, address)
        return self.complete_connect(sock, err, timeout)

    def complete_connect(self, sock: Any, err: int, timeout: float) -> Any:
        """`connect`'s rest: wait at most `timeout` seconds for the connect of
        `sock`, begun with outcome `err` (`begin_connect`'s), to end; `sock`
        connected, or closed and OSError, TimeoutError raised (`connect_ended`).
        A greenlet goes on here with a connect the hub began (`balancer.inline`)."""
        try:
            if err == EINPROGRESS:
                if self.wait_writable(sock.fileno(), timeout):
                    err = sock.getsockopt(SOL_SOCKET, SO_ERROR)
                else:  # the timer came first: the connect may have ended all the same
                    err = connect_outcome(sock)
            connect_ended(err)
        except BaseException:
            sock.close()
            raise
        return sock

    def await_connect(self, sock: Any, timeout: float, then: Callable[[Any, int], None],
                      arg: Any) -> Connecting:
        """Wait in the hub, with no greenlet, for the connect of `sock` (begun,
        in progress) to end within `timeout` seconds: `then(arg, outcome)` is
        called in the loop with its `connect_outcome` (-1: timed out), as
        `complete_connect` would judge it."""
        return Connecting(self.hub.loop, sock, timeout, then, arg)

    def wait_writable(self, fd: int, timeout: float) -> bool:
        """Wait until `fd` is writable (True) or `timeout` seconds passed (False)."""
        loop, hub, current = self.hub.loop, self.hub, getcurrent()
        io, timer = loop.io(fd, WRITE), loop.timer(timeout)
        try:
            io.start(SWITCH, current, True)
            timer.start(SWITCH, current, False, update=True)  # from now, not the loop's last
            return bool(SWITCH(hub))
        finally:
            io.close()
            timer.close()

    def bounded(self, seconds: float) -> Any:
        return Timeout(seconds, TimeoutError)

    def arm(self, sock: Any, seconds: float) -> float:
        return self.now + seconds

    def arm_exactly(self, sock: Any, seconds: float) -> float:
        return time.monotonic() + seconds

    def turn(self) -> Turn:
        return Turn(self.hub)

    def attach(self, conn: Any) -> None:
        conn.task = getcurrent()
        self.connections.add(conn)

    def detach(self, conn: Any) -> None:
        conn.task = None  # its greenlet serves another connection next (balancer.serving)
        self.connections.discard(conn)

    def start(self, conn: Any) -> None:
        """A new plain client connection, just accepted (in the hub): open with no
        task, its first request served at once if it is there, else parked until
        it comes (`serve_new`, `balancer.inline`)."""
        conn.task = None
        self.connections.add(conn)
        self.serve_new(conn)

    def is_crowded(self) -> bool:
        return len(self.connections) > CROWDED

    def parks_at_once(self, ex: Any) -> bool:
        """Also after a request of the kind the hub serves (`servable`): parked,
        the connection costs no switch if its next request is one too."""
        return len(self.connections) > CROWDED or \
            (self.servable is not None and self.servable(ex))

    def park(self, conn: ClientConnection) -> bool:
        """The connection's task ends; its next readiness (or its deadline) gives
        it to a greenlet again (`on_wake` / `on_expire`, through `resume`). A TLS
        stream is parked only while OpenSSL holds no decrypted byte (`can_park`).
        (`conn` typed, not Any: its attributes and calls are native under mypyc,
        ~1,000 instructions less per parked request than looked up by name.)"""
        stream = conn.stream
        if self.resume is None or not stream.can_park():
            return False
        conn.task = None
        # (a stream that can park is a gevent worker's: `EventedStream`, `TLSStream`)
        cast(WatchedStream, stream).watcher.park(self.wake, conn)
        return True

    def linger(self, conn: Any, on_ready: Callable[[Any], None], arg: Any) -> bool:
        if self.resume is None:
            return False
        conn.task = None
        conn.stream.watcher.park(on_ready, arg)
        return True

    def close_parked(self, conn: Any) -> None:
        conn.deadline = NEVER
        self.resume(self.on_expire, (conn,))

    def _wake(self, conn: ClientConnection) -> None:
        serve = self.serve_ready
        if serve is None or not serve(conn):
            self.resume(self.on_wake, (conn,))

    def hand_off(self, conn: Any) -> None:
        """Go on serving `conn`, which has no task, in a greenlet (`on_wake`): it
        continues from where the hub left it (`balancer.inline`)."""
        self.resume(self.on_wake, (conn,))

    def _expire_parked(self, conn: Any) -> None:
        task = conn.task  # (not `conn.task is not None`: mypy would narrow `conn.task`
        if task is not None:  # to None below, and mypyc check it is None at run time)
            return
        if conn.deadline != EXPIRED:  # armed again since `expire` (the hub served it)
            return
        conn.deadline = NEVER
        if conn.stream.watcher.unpark():
            self.resume(self.on_expire, (conn,))
        elif self.on_overdue is not None and self.on_overdue(conn):
            # a request the hub serves: a greenlet waits for its answer instead, and
            # times out there as any other
            self.hand_off(conn)
            _throw_overdue(conn, conn.task)

    def _hang_up(self, conn: Any, ex: Any) -> None:
        """The watchdog's drop, in the loop, of `ex`, whose client hung up (FIN or
        reset: a client's end is taken as its going, as for a held request and
        as nginx does) while it waited on its backend: ClientGone is thrown
        where it waits, so the backend connection is closed at once, not counted
        against the backend, and the request logged as 499. A request the hub
        serves goes to a greenlet first (`on_overdue` stops the hub's wait)."""
        if conn.exchange is not ex or not ex.awaits or conn.deadline == EXPIRED:
            return  # answered, or timed out, since the watchdog looked
        task = conn.task
        if task is None:
            if self.on_overdue is None or not self.on_overdue(conn):
                return
            self.hand_off(conn)
            task = conn.task
        if task is not None and not task.dead:
            task.throw(ClientGone("client closed while its request waited on the backend"))

    # the watchdog's steps ------------------------------------------------
    def tick(self) -> float:
        self.now = now = time.monotonic()
        return now

    def expire(self, now: float) -> None:
        """Time out every connection whose deadline passed; drop the request of
        a client that hung up while it waited on its backend, its whole request
        read, for HANG_UP_AFTER (since `backend_read` was armed: `_hang_up`);
        ask a greenlet that has waited PARK_AFTER for its connection's next
        request to park it. One connection that raises is
        passed over and the others seen to; the first such exception is raised
        after (the watchdog's problem: bug, it stopped the rest being expired
        that tick, and every tick after)."""
        loop, parks = self.hub.loop, self.resume is not None
        failed: Exception | None = None
        waited, hangups = now - HANG_UP_AFTER, self.hangups
        for conn in list(self.connections):
            try:
                ex = conn.exchange
                if conn.deadline < now:
                    if conn.task is not None:
                        conn.deadline = EXPIRED
                        loop.run_callback(_time_out, conn, conn.task)
                    elif not has_come(conn):  # parked, and nothing to see to first
                        conn.deadline = EXPIRED
                        loop.run_callback(self._expire_parked, conn)
                elif ex is not None and ex.awaits and ex.body_done \
                        and conn.deadline < waited + conn.ctx.backend_read:
                    hangups.watch(conn, ex)  # (armed backend_read that long ago)
                elif parks and conn.idle and _is_due_to_park(conn, now):
                    if conn.task is not None:
                        loop.run_callback(_park_idle, conn, conn.task)
                    elif conn.remembers():  # parked at once (`parks_at_once`): now idle
                        conn.forget()
            except Exception as exc:
                failed = failed or exc
        for conn, ex in hangups.gone():
            loop.run_callback(self._hang_up, conn, ex)
        if failed is not None:
            raise failed

    def close_idle(self, by: float) -> None:
        for conn in self.connections:
            if conn.idle and conn.deadline > by:
                conn.deadline = by

    # held requests -------------------------------------------------------
    def wait_any(self, events: Sequence[Any], stream: Stream, timeout: float,
                 watch_client: bool) -> bool:
        """Wait for any of `events` (or `timeout`), watching the client socket
        too while `watch_client`: a hang-up raises ClientGone; a client that
        sent more data (pipelining) is not watched any further."""
        if not self.wait_stirred(events, stream.sock, timeout, watch_client):
            return watch_client
        return not stream.has_sent_more()

    def wait_stirred(self, events: Sequence[Any], sock: Any, timeout: float,
                     watch_client: bool) -> bool:
        """Wait for any of `events` (or `timeout`), or, while `watch_client`, for
        the client socket to be readable; whether the client socket woke it."""
        from gevent.event import Event

        wake = Event()
        stirred: list[bool] = []

        def on_event(_event: Any) -> None:
            wake.set()

        def on_client() -> None:
            stirred.append(True)
            wake.set()

        watcher: Any = None
        if watch_client:
            watcher = self.hub.loop.io(sock.fileno(), READ)
            watcher.start(on_client)
        for event in events:
            event.rawlink(on_event)
        try:
            wake.wait(timeout)
        finally:
            for event in events:
                event.unlink(on_event)
            if watcher is not None:
                watcher.stop()
                watcher.close()
        return bool(stirred)


def _is_due_to_park(conn: Any, now: float) -> bool:
    """Whether idle `conn` has waited min(PARK_AFTER, client_idle / 2) in its
    greenlet (its deadline is client_idle after the wait began)."""
    idle = conn.ctx.timeouts.client_idle
    return (conn.stream.can_park()
            and conn.deadline - idle + min(PARK_AFTER, idle / 2) < now)


def _park_idle(conn: Any, task: Any) -> None:
    """Throw ParkNow into `task` if it still waits, idle, for `conn`'s next request."""
    if conn.idle and conn.task is task and not task.dead:
        task.throw(ParkNow())


def _judge_readiness(arg: Any) -> None:
    """A watched stream's readiness (`Stream.watch`), in the hub: throw what
    the judge returns into the watching greenlet, or watch on."""
    watcher, judge, task = arg
    verdict = judge()
    if verdict is True:
        if not watcher.closed:
            watcher.park(_judge_readiness, arg)
    elif verdict is not False and not task.dead:
        task.throw(verdict)


def _time_out(conn: Any, task: Any) -> None:
    """The watchdog's throw, in the loop, for `conn` served by `task`, whose
    deadline passed: dropped if a deadline was armed since (`EXPIRED`)."""
    if conn.deadline == EXPIRED:
        conn.deadline = NEVER
        _throw_overdue(conn, task)


def _throw_overdue(conn: Any, task: Any) -> None:
    """Throw Overdue into `task` if it still serves `conn` (a greenlet goes on
    to another connection once this one closed)."""
    if conn.task is task and not task.dead:
        task.throw(Overdue("deadline passed"))


class TLSStream(WatchedStream):
    """A TLS socket (gevent's SSLSocket, handshake done) used through its SSL
    object: a read waits on the socket's `Readable` only when OpenSSL needs more
    bytes, and for the socket to be writable when OpenSSL must first write what
    the socket cannot take yet (on the writer's watcher); writes go through a
    `balancer.outbox.TLSWriter` (one SSL_write each, a response's last one held
    for the loop's outbox; gevent's ``sendall`` only when the socket buffer is
    full or OpenSSL must read first).

    A TLS socket's readability is not a request byte: it may be a record that
    is no data (a ticket, a key update, an alert), or half a record; and bytes
    OpenSSL already decrypted (`pending`) leave the socket unreadable. So a held
    client's readiness is judged by reading through OpenSSL
    (`has_sent_more`), and what that read is kept for the next reader (`held`),
    and an idle pooled connection is clean only if its socket stayed quiet and
    OpenSSL holds nothing either (`is_clean`)."""

    def __init__(self, sock: Any, watcher: Readable, outbox: Outbox) -> None:
        obj: Any = sock._sslobj
        super().__init__(sock, watcher, TLSWriter(sock, obj, outbox))
        self.obj = obj
        self.held = b""  # read while the client was held (`has_sent_more`), not yet taken

    def recv(self, size: int) -> bytes:
        if self.held:
            return self.unread()
        obj = self.obj
        while True:
            try:
                data = obj.read(size)
                break
            except SSLWantReadError:
                self.watcher.wait()
            except SSLWantWriteError:  # OpenSSL must write first (a handshake message,
                # an alert) and the socket is full: the read again once it is writable
                self.wait_writable()
            except SSLZeroReturnError:
                data = b""
                break
            except OSError as exc:
                raise self.refused(exc) from None
        return data if data else self.ended()

    def read_ready(self, size: object) -> bytes | None:
        if self.held:
            return self.unread()
        try:
            data = self.obj.read(size)
        except SSLWantReadError:
            return None
        except SSLZeroReturnError:
            data = b""
        except OSError as exc:
            raise self.refused(exc) from None
        return data if data else self.ended()

    def ended(self) -> bytes:
        """What a read that met the end of the stream gives: b"", but
        `RenegotiationRefused`, raised, on a backend connection whose reading
        `balancer.backend_tls._watch` shut (in `REFUSED`)."""
        if self.obj.owner in REFUSED:
            raise RenegotiationRefused()
        return b""

    def refused(self, exc: OSError) -> OSError:
        """What to raise for `exc`, a read's error: itself, but `RenegotiationRefused`
        on a backend connection whose reading `_watch` shut (the backend's own
        alert, ending the refused renegotiation, may come before the end of stream)."""
        return RenegotiationRefused() if self.obj.owner in REFUSED else exc

    def wait_readable(self) -> None:
        if not self.held and not self.obj.pending():
            self.watcher.wait()

    def wait_writable(self) -> None:
        get_hub().wait(self.writer.writable())

    def has_sent_more(self) -> bool:
        if self.held:
            return True
        try:
            data = self.obj.read(HELD_READ)
        except SSLWantReadError:
            return False  # half a record, or a record that is no data
        except SSLWantWriteError:  # OpenSSL must first write (its answer to a key
            # update, a renegotiation's refusal) what the full socket cannot take.
            # Bug: taken as the client gone (a 499). Not waited for here (a client
            # that reads nothing would hold up the release): the client is not
            # watched any further, as after pipelining, and the next read or write
            # waits for the socket to be writable
            return True
        except SSLZeroReturnError:
            raise ClientGone("client closed (close_notify) while held") from None
        except OSError as exc:  # SSLError included: an unclean end, a reset
            raise ClientGone(f"client connection failed while held: {exc}") from None
        if not data:
            raise ClientGone("client closed while held")
        self.held = data
        return True

    def unread(self) -> bytes:
        held, self.held = self.held, b""
        return held

    def can_park(self) -> bool:
        return not self.held and not self.obj.pending()

    def is_clean(self) -> bool:
        watcher = self.watcher
        return not self.obj.pending() and (
            watcher.is_quiet() or nothing_came(watcher, self.sock))


class TLSIO(IO):
    """The worker's `IO` for TLS client sockets (`balancer.tls`): TLS streams,
    everything else the worker's own (its deadlines, its connection set, parking
    idle connections). Here,
    not in `balancer.tls`, because an interpreted class cannot extend a
    compiled one."""

    def __init__(self, io: IO) -> None:
        self.io = io

    def stream(self, sock: Any) -> Stream:
        return self.io.tls_stream(sock)

    def tls_stream(self, sock: Any) -> Stream:
        return self.io.tls_stream(sock)

    def connect(self, family: int, address: tuple[str, int], timeout: float) -> Any:
        return self.io.connect(family, address, timeout)

    def bounded(self, seconds: float) -> Any:
        return self.io.bounded(seconds)

    def arm(self, sock: Any, seconds: float) -> float:
        return self.io.arm(sock, seconds)

    def arm_exactly(self, sock: Any, seconds: float) -> float:
        return self.io.arm_exactly(sock, seconds)

    def turn(self) -> Turn:
        return self.io.turn()

    def attach(self, conn: Any) -> None:
        self.io.attach(conn)

    def detach(self, conn: Any) -> None:
        self.io.detach(conn)

    def is_crowded(self) -> bool:
        return self.io.is_crowded()

    def parks_at_once(self, ex: Any) -> bool:
        return self.io.parks_at_once(ex)

    def park(self, conn: Any) -> bool:
        return self.io.park(conn)

    def linger(self, conn: Any, on_ready: Callable[[Any], None], arg: Any) -> bool:
        return self.io.linger(conn, on_ready, arg)

    def close_parked(self, conn: Any) -> None:
        self.io.close_parked(conn)

    def hand_off(self, conn: Any) -> None:
        """`GeventIO.hand_off` (the hub serves a TLS connection's requests too,
        `balancer.inline`; only a gevent worker's connections are handed off)."""
        io: Any = self.io
        io.hand_off(conn)

    def wait_any(self, events: Sequence[Any], stream: Stream, timeout: float,
                 watch_client: bool) -> bool:
        return self.io.wait_any(events, stream, timeout, watch_client)
