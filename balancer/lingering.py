"""Lingering close: after a response that closes its connection while the client
may still be sending, read and discard what it sends before closing.

Closing a socket with received bytes unread, or while more arrive, makes the
kernel answer with a TCP reset instead of a FIN: the client's next send fails,
and a client that reads its response only once its request is sent (most
do) never sees it; a reset may also destroy response bytes not yet read. So,
as nginx (`lingering_close`) and RFC 9112 §9.6 ("close in stages"): the
connection is half-closed (shutdown(SHUT_WR): the response ends with a FIN),
then what the client still sends is read and dropped until it stops (EOF), it
stays silent for `timeouts.linger_idle`, `timeouts.linger` passed, or
`limits.max_linger_bytes` were read; then the connection is closed.

Which connections linger is `balancer.connection`'s call
(`ClientConnection.linger`): those whose request body was not all read (an
early answer from the backend, 413, 429, a 5xx before the body, a body over
the drain limit), whose framing broke (400), whose malformed head was refused
(400, 414, 417, 431; not a 408), and those closed by the balancer although
their client asked to keep them (its next request may be on its way). A
`Connection: close` request read whole, and every keep-alive response, never
get here.

Invariants:
* Lingering holds no greenlet: the connection is parked on its socket's
  `Readable` (`IO.linger`), whose readiness calls `_drain` in the loop, which
  reads the OS socket with `recv_now` (no exception, never blocks) until it
  would block. A TLS connection is drained under OpenSSL (ciphertext,
  never decrypted: nothing it says matters any more).
* A lingering connection stays open where open connections are counted (the
  worker's `Slots`, `Stats.open_connections`, the listeners' cap) and is
  counted in `Stats.lingering_connections` too, until `end_client` closes it;
  its deadline (the next `linger_idle`, at most the end of `linger`) is the
  watchdog's as any parked connection's (`expire_client` closes it), armed
  from the clock at each readiness; a deadline passed with bytes waiting is
  left to the readiness (`netio.has_come`), whose `drain` closes the
  connection itself once `linger` (or a drain's cut) has passed.
* It is `idle`: a draining worker closes it within DRAIN_IDLE like an idle
  keep-alive connection, and no read extends its deadline while the worker
  drains. A crowded worker (`IO.is_crowded`) does not linger at all.
* At most READS_PER_WAKE reads per readiness: a client sending at full speed
  waits for the next loop iteration like any other.
"""

from __future__ import annotations

import socket
import time
from _socket import socket as RawSocket
from typing import Any, Final

from balancer.sockcalls import recv_now

RECV_SIZE: Final = 65536
READS_PER_WAKE: Final = 16  # 1 MiB at most per readiness


class Lingering:
    """One worker's lingering close, with its bounds (from the settings)."""

    def __init__(self, total: float, idle: float, max_bytes: int, stats: Any) -> None:
        self.total = total  # seconds at most (0: never linger)
        self.idle = idle  # seconds without a byte that end it
        self.max_bytes = max_bytes
        self.stats = stats

    def start(self, conn: Any) -> bool:
        """Half-close answered `conn` and linger (True: it is parked, `end_client`
        closes it later), or not (False: the caller closes it now). Runs in the
        connection's greenlet: what is still held of the response is sent first."""
        io = conn.io
        if self.total <= 0 or io.is_crowded():
            return False
        stream = conn.stream
        sock = os_socket(stream)
        if sock is None:
            return False
        try:
            if stream.has_held():  # within client_idle, as `ClientConnection.close`
                conn.arm(conn.sock, conn.ctx.client_idle)
                stream.finish()
            sock.shutdown(socket.SHUT_WR)
        except (OSError, TimeoutError):
            return False
        state = Linger(self, conn, sock, io.arm(conn.sock, self.total))
        conn.parser.close()  # nothing more is parsed: what llhttp holds goes now
        conn.events.clear()
        conn.idle = True
        conn.deadline = min(io.arm(conn.sock, self.idle), state.end)
        if not io.linger(conn, drain, state):
            return False
        self.stats.lingering_connections += 1
        return True


class Linger:
    """One lingering connection: its OS socket, when it must end, what it may
    still read."""

    __slots__ = ("lingering", "conn", "sock", "end", "left")

    def __init__(self, lingering: Lingering, conn: Any, sock: Any, end: float) -> None:
        self.lingering = lingering
        self.conn = conn
        self.sock = sock
        self.end = end
        self.left = lingering.max_bytes


def drain(state: Linger) -> None:
    """A lingering connection's readiness (in the loop): read and drop what came;
    close at EOF, an error or past `max_linger_bytes`; else wait on."""
    conn, sock = state.conn, state.sock
    left = state.left
    for _ in range(READS_PER_WAKE):
        try:
            data = recv_now(sock, RECV_SIZE)
        except OSError:  # a reset: the client is gone
            data = b""
        if data is None:
            break
        left -= len(data)
        if not data or left < 0:
            conn.io.close_parked(conn)
            return
    state.left = left
    # from the clock, not the watchdog's last tick (`IO.arm`): after a stall (a loaded
    # machine) that tick is older than linger_idle, so a deadline armed from it had
    # passed already (bug: a client that sent in time was cut at the next tick)
    now = time.monotonic()
    deadline = min(now + state.lingering.idle, state.end)
    if conn.ctx.draining:  # a draining worker's cut (`close_idle`) stands
        deadline = min(deadline, conn.deadline)
    if deadline <= now:  # past `linger` or the drain's cut: the watchdog leaves it to us
        conn.io.close_parked(conn)
        return
    conn.deadline = deadline
    conn.io.linger(conn, drain, state)


def discard_waiting(sock: Any) -> None:
    """Read and drop what `sock` (an OS socket, non-blocking) holds now, up to
    READS_PER_WAKE reads: a close then finds nothing unread and sends no reset
    (raises OSError)."""
    for _ in range(READS_PER_WAKE):
        if not recv_now(sock, RECV_SIZE):
            return


def os_socket(stream: Any) -> Any:
    """The OS socket under `stream` (an evented or a TLS one), or None."""
    raw = getattr(stream, "raw", None)  # `EventedStream`
    if raw is not None:
        return raw
    sock = stream.sock
    if isinstance(sock, RawSocket):
        return sock
    return getattr(sock, "_sock", None)  # gevent's socket (a TLS one too): its OS socket
