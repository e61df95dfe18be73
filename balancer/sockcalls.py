"""The data plane's socket calls on non-blocking sockets, picked once at import.

`recv_now` and `send_now` are what `balancer.netio.EventedStream` and
`balancer.outbox.Writer` read and write the OS socket with, `send_span_now`
what a writer sends a response's head and its body with in one syscall, the
body a `balancer.spans.Span` of the bytes it was read into (not sliced out
or joined to the head: no copy, no allocation), `accept_now` what
`balancer.serving.Slots.accept` accepts client connections with, `peek_now`
what an idle pooled connection is looked at with before a request that may
not go twice (`balancer.netio.EventedStream.is_untouched`). In a compiled
build (setup.py, not under ``BALANCER_PURE=1``) they are the C extension
`balancer._sockio`'s functions, which make the syscall without releasing the
GIL (a worker's data plane is one thread, and a non-blocking syscall never
blocks), take their arguments without a tuple, read into one reusable
buffer before copying exactly what came, and accept a connection
non-blocking at once (accept4, no ioctl after); elsewhere (an interpreted
install, or an extension that will not load) their Python equivalents
below, which behave the same. What the C calls save is measured in
docs/performance.md ("socket calls without the GIL").

Invariants:
* Both take the socket object (`_socket.socket` or a subclass), never its
  descriptor: a closed socket fails with EBADF (OSError), whichever is used.
* None blocks or raises BlockingIOError: nothing to read now is None, a
  full send buffer is 0 bytes sent, an empty accept queue is None.
* `send_span_now(sock, head, (data, start))` sends what `send_now` would of
  ``head + data[start:]`` (the count covers both, in that order), in one
  sendmsg; a start outside `data` is a ValueError.
* `peek_now(sock)` reads nothing and raises no OSError: NOTHING (nothing to
  read now: open), WAITING (bytes) or ENDED (EOF, or any failure: a reset, a
  closed socket).
* An accepted socket is an OS socket (`_socket.socket`), non-blocking, with
  its address as ``listener._accept()`` gives it.
* Every other failure is the OSError ``sock.recv`` / ``sock.send`` /
  ``listener._accept()`` raises
  (errno and subclass: ConnectionResetError, BrokenPipeError, ...); a call
  interrupted by a signal runs the signal handlers and is retried.
"""

from __future__ import annotations

import socket
from _socket import SOCK_STREAM
from _socket import socket as RawSocket
from collections.abc import Callable
from typing import Any, Final

from balancer.spans import Span

Recv = Callable[[Any, Any], "bytes | None"]  # (the size: an int, `EventedStream.read_ready`)
Send = Callable[[Any, "bytes | memoryview"], int]
SendSpan = Callable[[Any, bytes, Span], int]
Accept = Callable[[Any, int], "tuple[RawSocket, Any] | None"]
Peek = Callable[[Any], int]
# what `peek_now` finds (Final: a compiled module compares with the literal, no lookup)
NOTHING: Final = 0
WAITING: Final = 1
ENDED: Final = -1


def recv_py(sock: socket.socket, size: int) -> bytes | None:
    """Up to `size` bytes now (b"" at EOF), None if none can be read now."""
    try:
        return sock.recv(size)
    except BlockingIOError:
        return None


def send_py(sock: socket.socket, data: bytes | memoryview) -> int:
    """How many bytes of `data` the socket took now (0: its buffer is full)."""
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


def send_span_py(sock: socket.socket, head: bytes, span: Span) -> int:
    """How many bytes of `head` and then of `span`'s the socket took now, in one
    sendmsg (0: its buffer is full)."""
    data, start = span
    if not 0 <= start <= len(data):
        raise ValueError("send_span() start out of its bytes")
    try:
        return sock.sendmsg((head, memoryview(data)[start:]))
    except BlockingIOError:
        return 0


def accept_py(listener: RawSocket, proto: int) -> tuple[RawSocket, Any] | None:
    """The next connection waiting on `listener` as (OS socket, non-blocking,
    address), None if none waits now."""
    while True:
        try:
            fd, address = listener._accept()  # type: ignore[attr-defined]
        except BlockingIOError:
            return None
        sock = RawSocket(listener.family, SOCK_STREAM, proto, fd)  # no syscall: all given
        try:
            sock.setblocking(False)
        except OSError:
            sock.close()  # gone before it could be set up: nothing to answer
            continue
        return sock, address


def peek_py(sock: RawSocket) -> int:
    """What waits on `sock`'s read side now (NOTHING, WAITING, ENDED), looked at
    without reading or waiting."""
    timeout = sock.gettimeout()
    if timeout:  # (the socket module's recv would wait for readability first)
        return _peek_untimed(sock, timeout)
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return NOTHING
    except OSError:
        return ENDED
    return WAITING if data else ENDED


def _peek_untimed(sock: RawSocket, timeout: float) -> int:
    """`peek_py` of `sock`, which has `timeout`: with none for the call."""
    try:
        sock.settimeout(0.0)
    except OSError:  # (closed: EBADF)
        return ENDED
    try:
        return peek_py(sock)
    finally:
        sock.settimeout(timeout)


def _extension() -> Any:
    """`balancer._sockio`, or None where it was not built or will not load."""
    try:
        from balancer import _sockio
    except ImportError:
        return None
    return _sockio


_SOCKIO: Final = _extension()
NATIVE: Final = _SOCKIO is not None  # the C calls are used
recv_now: Final[Recv] = recv_py if _SOCKIO is None else _SOCKIO.recv
send_now: Final[Send] = send_py if _SOCKIO is None else _SOCKIO.send
send_span_now: Final[SendSpan] = send_span_py if _SOCKIO is None else _SOCKIO.send_span
accept_now: Final[Accept] = accept_py if _SOCKIO is None else _SOCKIO.accept
peek_now: Final[Peek] = peek_py if _SOCKIO is None else _SOCKIO.peek
