"""Non-blocking look at a socket's read side, for idle pooled and held client sockets."""

from __future__ import annotations

import _socket
import socket

from balancer.sockcalls import ENDED, NATIVE, NOTHING, WAITING, peek_now

TCP_INFO = getattr(socket, "TCP_INFO", -1)  # Linux's; -1: getsockopt fails (OSError)

OPEN, READABLE, CLOSED = "open", "readable", "closed"
STATES = {NOTHING: OPEN, WAITING: READABLE, ENDED: CLOSED}  # `peek_now`'s, as `peek`'s
# tcpi_state values (linux/tcp_states.h) of a connection whose peer ended its side
TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8


def peek(sock: socket.socket) -> str:
    """OPEN (nothing to read), READABLE (data waiting) or CLOSED (EOF or error).

    The socket's timeout is set to 0 for the call so that gevent sockets do
    not wait for readability, and restored afterwards.
    """
    timeout = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        data = sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return OPEN
    except OSError:
        return CLOSED
    finally:
        sock.settimeout(timeout)
    return READABLE if data else CLOSED


def peek_under(sock: socket.socket) -> str:
    """`peek` at the TCP socket under `sock` (a TLS socket: bypassing OpenSSL),
    leaving the descriptor's blocking mode alone (`balancer.sockcalls.peek_now`).
    The C peek takes the C socket as it is (the socket module's, gevent's
    `_sock`, its SSLSocket's too): one syscall. Else a C socket is made for the
    descriptor (three more syscalls and ~3 µs: a pooled TLS connection is
    peeked at before each request it takes, `balancer.pool.Backend.is_open`)."""
    under = sock if isinstance(sock, _socket.socket) else getattr(sock, "_sock", None)
    if NATIVE and isinstance(under, _socket.socket):
        return STATES[peek_now(under)]
    raw = _socket.socket(fileno=sock.fileno())  # the C socket: never gevent's
    try:
        return STATES[peek_now(raw)]
    finally:
        raw.detach()


def has_hung_up(sock: socket.socket) -> bool:
    """Whether the peer of TCP socket `sock` closed or reset its side, even
    with bytes it sent still unread (a peek sees those, never the EOF behind
    them): the kernel's TCP state (TCP_INFO), CLOSE_WAIT or CLOSE. False
    where the kernel tells no TCP state (not Linux, not TCP)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 1)
    except OSError:
        return False
    return bool(info) and info[0] in (TCP_CLOSE, TCP_CLOSE_WAIT)
