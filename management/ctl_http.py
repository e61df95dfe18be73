"""One HTTP exchange of `balancerctl` with the management API, bounded against a
hostile or broken server at ``--url``.

Invariants:
* A request goes to ``--url`` and nowhere else: redirects are never followed
  (`http.client` has no redirect handling; urllib's ``urlopen`` followed them
  and sent the ``Authorization`` header to the new location, another host
  included). The caller sees the 3xx answer and its ``Location``.
* An answer's body is read up to `limit` bytes: a larger ``Content-Length`` is
  refused before any of the body is read, and one byte past `limit` ends the
  read (a flood or an endless chunked body costs `limit` bytes of memory). The
  head is bounded by `http.client` (64 KiB a line, 100 fields).
* Every exchange ends by its deadline, `timeout` seconds from its start, however
  the server trickles: a watchdog shuts the connection down then (a socket
  timeout alone counts each read, and one byte a second never times out).
* ``https://`` URLs are verified as browsers do: the system's CAs (or the bundle
  ``SSL_CERT_FILE`` names) and the URL's host name.
* Every failure is `Unreachable` (no connection: the server may not run) or
  `Unanswered` (no whole answer), with a reason for one line.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from email.message import Message
from urllib.parse import urlsplit

READ_SIZE = 65536


class Unreachable(Exception):
    """No connection to the server (refused, no route, no answer to SYN)."""


class Unanswered(Exception):
    """Connected, but no whole HTTP answer within the limits."""


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    headers: Message
    body: bytes


def exchange(url: str, method: str, path: str, body: bytes | None, headers: dict[str, str],
             timeout: float, limit: int) -> Answer:
    """`method` `path` with `body` to `url` (``http(s)://HOST[:PORT][/PREFIX]``): the
    answer, its body at most `limit` bytes, within `timeout` seconds in all (the
    connection itself: `timeout` for each of the host's addresses tried)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    tls = ssl.create_default_context() if parts.scheme == "https" else None
    conn = (http.client.HTTPConnection(host, parts.port, timeout=timeout) if tls is None else
            http.client.HTTPSConnection(host, parts.port, timeout=timeout, context=tls))
    watchdog = Watchdog(timeout)
    try:
        conn.sock = _connect(conn.host, conn.port, tls, watchdog)  # (never its own connect)
        try:
            conn.request(method, parts.path.rstrip("/") + path, body=body, headers=headers)
            response = conn.getresponse()
            data = _read_body(response, limit)
        except (OSError, http.client.HTTPException) as exc:
            raise Unanswered(watchdog.expired_reason() or _failure(exc)) from None
        if watchdog.expired:  # the body ended with the connection the watchdog shut down
            raise Unanswered(watchdog.expired_reason())
        return Answer(response.status, response.reason, response.msg, data)
    finally:
        watchdog.stop()
        conn.close()


def _connect(host: str, port: int, tls: ssl.SSLContext | None,
             watchdog: Watchdog) -> socket.socket:
    """A connection to `host`, under `watchdog` from the moment it is made (a TLS
    handshake included), or `Unreachable`."""
    try:
        sock = socket.create_connection((host, port), watchdog.timeout)
    except TimeoutError:
        raise Unreachable(f"no connection within {watchdog.timeout:g}s") from None
    except OSError as exc:
        raise Unreachable(exc.strerror or str(exc) or type(exc).__name__) from None
    watchdog.watch(sock)
    if tls is None:
        return sock
    try:
        return tls.wrap_socket(sock, server_hostname=host)
    except OSError as exc:
        raise Unanswered(_tls_failure(exc, watchdog)) from None


def _tls_failure(exc: OSError, watchdog: Watchdog) -> str:
    if watchdog.expired_reason():
        return f"TLS handshake: {watchdog.expired_reason()}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"its TLS certificate is not trusted: {exc.verify_message} (the system's "
                f"CAs, or the bundle SSL_CERT_FILE names, must vouch for it)")
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc} (does it serve https?)"
    return f"TLS handshake failed: {_failure(exc)}"


def _read_body(response: http.client.HTTPResponse, limit: int) -> bytes:
    """The whole body, or `Unanswered` once it is over `limit` bytes."""
    if response.length is not None and response.length > limit:
        raise Unanswered(_too_large(limit, f"announces {response.length} bytes, over"))
    data = bytearray()
    while chunk := response.read(min(READ_SIZE, limit + 1 - len(data))):
        data += chunk
        if len(data) > limit:
            raise Unanswered(_too_large(limit, "goes on past"))
    if response.length:  # (read(amt) returns what came at a close, short or not)
        raise http.client.IncompleteRead(bytes(data), response.length)
    return bytes(data)


def _too_large(limit: int, what: str) -> str:
    return (f"its answer {what} the {limit >> 20} MiB balancerctl reads (the routing "
            f"table of 100,000 proxy hosts is about 21 MiB)")


def _failure(exc: Exception) -> str:
    """One line on what went wrong once connected (the bug these name: tracebacks
    or urllib's bare reasons for a server that breaks off or is not HTTP)."""
    if isinstance(exc, http.client.RemoteDisconnected):
        return "closed the connection without answering"
    if isinstance(exc, http.client.IncompleteRead):
        more = f", {exc.expected} more announced" if exc.expected else ""
        return f"closed the connection in the middle of its answer ({len(exc.partial)} bytes{more})"
    if isinstance(exc, http.client.BadStatusLine | http.client.UnknownProtocol):
        return f"answered something that is not HTTP/1.x (it began {str(exc)[:40]!r})"
    if isinstance(exc, http.client.LineTooLong):
        return f"answered with a head line too long ({exc})"
    if isinstance(exc, ConnectionResetError):
        return "reset the connection before its answer was whole"
    if isinstance(exc, TimeoutError):
        return "stopped sending (a read timed out)"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return f"answered with a broken head ({exc or type(exc).__name__})"


class Watchdog:
    """Shuts a connection down `timeout` seconds after the exchange began: a read,
    write or TLS handshake in progress then ends, whatever the server sends.

    Invariant: it shuts down its own duplicate of the connection's descriptor
    (`watch`), closed only by `stop`: the connection's socket object may be
    wrapped in TLS (detached) or closed meanwhile, and no other file can have
    taken that descriptor's number."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.expired = False
        self.lock = threading.Lock()
        self.spare: socket.socket | None = None
        self.timer: threading.Timer | None = None

    def watch(self, sock: socket.socket) -> None:
        """Start the countdown to the deadline for `sock` (connected)."""
        self.spare = sock.dup()
        self.timer = threading.Timer(max(0.0, self.deadline - time.monotonic()), self._expire)
        self.timer.daemon = True
        self.timer.start()

    def expired_reason(self) -> str | None:
        """Why the exchange failed if it failed at the deadline, else None."""
        if self.expired or time.monotonic() >= self.deadline:
            return f"no whole answer within {self.timeout:g}s (--timeout)"
        return None

    def _expire(self) -> None:
        with self.lock:
            if self.spare is None:
                return
            self.expired = True
            with contextlib.suppress(OSError):  # (a connection the server closed)
                self.spare.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        with self.lock:
            if self.spare is not None:
                self.spare.close()
                self.spare = None
