"""Non-blocking look at a socket's read side, for idle pooled and held client sockets."""

from __future__ import annotations

import _socket
import socket

OPEN, READABLE, CLOSED = "open", "readable", "closed"


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
    leaving the descriptor's blocking mode alone (MSG_DONTWAIT)."""
    raw = _socket.socket(fileno=sock.fileno())  # the C socket: never gevent's
    try:
        data = raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return OPEN
    except OSError:
        return CLOSED
    finally:
        raw.detach()
    return READABLE if data else CLOSED
