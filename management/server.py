"""The management listener: gevent's WSGI server, hardened like the data plane.

Invariants (SPEC §5: "header timeout, connection cap, body limits"):

* A connection has `timeouts.client_header` from its accept, and each later
  request from its first byte, to send a whole request head; between
  requests it may idle `timeouts.client_idle`. Past either it is closed (with
  408 when a head was started). A head over `limits.max_header_bytes` or
  with more than 100 fields is answered 431; a request line over 8 KiB 414.
  Every refusal, of a head as of a request, is the API's JSON error shape
  (`management.http.error_bytes`; `refusal` names the code).
* A request body is read whole (at most `MAX_BODY` bytes) before the app
  runs, within `timeouts.client_header`: larger is 413, slower 408; either
  closes the connection, lingering (`ManagementHandler.linger`: what the
  client still sends, up to `LINGER_BYTES`, is read and dropped first, so the
  answer is not lost to a reset). The app never waits on a client. A request
  the head alone refuses (`early`: no token, a web page's) is answered before
  its body is read, without ``100 Continue``, and the connection closed (nginx
  with `auth_request` or basic auth does the same).
* Every socket read or write that makes no progress for
  `timeouts.client_header` ends the connection (a response nobody reads).
* At most `max_connections` connections are open. One more displaces the
  connection that has waited longest for a request head (slowloris holds
  connections in exactly that state), so an operator's request gets in
  however many half-sent requests are open; when every connection is inside
  a request, the new one is closed. The cap fits the descriptor limit
  (`api_connection_cap`) and one connection is accepted per turn of the loop, so
  a flood of connections displaces rather than running out of descriptors;
  an accept that runs out all the same (a limit lowered by `prlimit` since)
  displaces one too, or rests (`balancer.resting`), never a traceback.
* A head that frames its body ambiguously (`framing_problem`) is answered
  400 and the connection closed, as a malformed one.
* Refused or malformed requests never log a traceback.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from gevent import Timeout, get_hub, getcurrent
from gevent.pool import Pool
from gevent.pywsgi import MAX_REQUEST_LINE, Input, WSGIHandler, WSGIServer

from balancer.peek import OPEN, peek_under
from balancer.resting import RestingServer
from management.http import MAX_BODY, ApiError, error_bytes, error_response

log = logging.getLogger("balancer")

MAX_CONNECTIONS = 256  # management connections per process
MIN_CONNECTIONS = 16  # kept however low the descriptor limit: the operator gets in
# what a connection whose body was refused reads and drops before it closes (`linger`)
LINGER_BYTES = 16 * MAX_BODY
LINGER_READ = 65536
# what reading a request head raises for a client's fault (`refusal`)
CLIENT_ERRORS = (ValueError, OSError, http.client.HTTPException)


class IdleClose(Exception):
    """A draining server ends a kept-alive connection waiting for its next request
    (`ManagementHandler.close_if_idle`)."""


class HeadTimeout(ValueError):
    """The request head did not arrive within `timeouts.client_header`."""


class HeadTooLarge(ValueError):
    """The request head is over `limits.max_header_bytes`."""


class LineTooLong(ValueError):
    """The request line is `MAX_REQUEST_LINE` bytes or more."""


class BoundedHead:
    """The connection's reader, for one head: raises `HeadTooLarge` past `budget` bytes."""

    def __init__(self, rfile: Any, budget: int) -> None:
        self.rfile = rfile
        self.budget = budget

    def readline(self, size: int = -1) -> bytes:
        limit = self.budget + 1 if size < 0 else min(size, self.budget + 1)
        line = self.rfile.readline(limit)
        self.budget -= len(line)
        if self.budget < 0:
            raise HeadTooLarge("request head too large")
        return line


class RawTargetHandler(WSGIHandler):
    """gevent's handler, giving the app the request target as sent (``REQUEST_URI``
    and ``RAW_URI``, as werkzeug's and gunicorn's servers do): the API routes by
    its path, percent-encoding kept (`management.http.route_path`)."""

    def get_environ(self) -> dict[str, Any]:
        env: dict[str, Any] = super().get_environ()
        env["REQUEST_URI"] = env["RAW_URI"] = self.path
        return env


class ManagementHandler(RawTargetHandler):
    """One management connection with the deadlines and limits above."""

    server: ManagementServer

    def __init__(self, sock: Any, address: Any, server: ManagementServer) -> None:
        super().__init__(sock, address, server)
        self.accepted = time.monotonic()
        self.served = 0  # requests answered on this connection
        self.head_timer: Timeout | None = None
        self.task = getcurrent()
        self.idle = False  # waiting for the next request on a kept-alive connection

    def handle(self) -> None:
        try:
            super().handle()
        finally:
            self.stop_timer()
            self.server.forget(self)

    # the request head ----------------------------------------------------
    def read_requestline(self) -> str:
        """Wait (idle) for the next request, then read its line against the head deadline."""
        settings = self.server.timeouts
        now = time.monotonic()
        start = now if self.served else self.accepted
        self.server.waiting(self)
        if self.served and self.server.draining and not self.has_pending():
            return self.close_idle()  # (its last answer began before the drain)
        self.socket.settimeout(settings.client_idle if self.served
                               else max(0.001, start + settings.client_header - now))
        self.idle = bool(self.served)
        try:
            arrived = self.rfile.peek(1)  # EOF: b""; a timeout raises OSError, which closes
        except IdleClose:
            return self.close_idle()
        finally:
            self.idle = False
        if not arrived:
            return ""
        if self.served:
            start = time.monotonic()
        self.socket.settimeout(settings.client_header)
        remaining = max(0.001, start + settings.client_header - time.monotonic())
        self.head_timer = Timeout.start_new(remaining, HeadTimeout("request head timeout"))
        try:
            line = super().read_requestline()
        except HeadTimeout as exc:
            return self.refuse(exc)
        # (gevent answers one as long itself, with an empty body)
        return self.refuse(LineTooLong()) if len(line) >= MAX_REQUEST_LINE else line

    def MessageClass(self, fp: Any, *args: Any) -> Any:  # noqa: N802 - gevent's name
        budget = self.server.max_header_bytes - len(self.requestline)
        headers = super().MessageClass(BoundedHead(fp, budget), *args)
        problem = framing_problem(headers)
        if problem:
            raise ValueError(problem)  # a 400, and the connection closed
        return headers

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Any:
        """A draining process's answers close their connections (`ManagementServer.drain`)."""
        if self.server.draining and not any(name.lower() == "connection" for name, _ in headers):
            headers = [*headers, ("Connection", "close")]
        return super().start_response(status, headers, exc_info)

    def finalize_headers(self) -> None:
        """Bug: a streamed answer (``/metrics``) to HEAD ended with a last chunk
        (``0``, CRLF, CRLF) though it has no body, taken as garbage or as the
        next response by the client's next read; the head stays GET's."""
        super().finalize_headers()
        if self.command == "HEAD":
            self.response_use_chunked = False

    def _handle_client_error(self, ex: BaseException) -> Any:
        """A malformed, too large or too slow head: answered and closed, never a traceback."""
        if not isinstance(ex, CLIENT_ERRORS):
            return super()._handle_client_error(ex)
        error = refusal(ex, self.server.max_header_bytes)
        if error.status == 400:
            log.debug("management: bad request from %s: %s", self.client_address, ex)
        return (str(error.status), error_bytes(error))

    def get_environ(self) -> dict[str, Any]:
        """The head is complete: its deadline ends here."""
        self.stop_timer()
        self.server.busy(self)
        return super().get_environ()

    # the request ----------------------------------------------------------
    def handle_one_response(self) -> None:
        problem = self.read_body()
        if problem is not None:  # answer it and close: the body's rest is not read
            problem.headers["Connection"] = "close"
            self.wsgi_input = self.environ["wsgi.input"] = Input(io.BytesIO(), 0)
            self.application = error_response(problem)
            self.close_connection = True
        super().handle_one_response()
        self.served += 1
        if problem is not None:
            self.linger()

    def linger(self) -> None:
        """After an answer that refused a body not read whole (413, 408, 400):
        half-close, read and drop what the client still sends until it stops, is
        silent for `timeouts.linger_idle`, `timeouts.linger` passed or
        `LINGER_BYTES` came, then close (RFC 9112 §9.6, as the data plane:
        `balancer.lingering`). Closed with bytes unread, the kernel resets the
        connection, and a client that sends its body whole before it reads got
        the reset, not the 413 (bug)."""
        timeouts = self.server.timeouts
        sock = self.socket
        deadline = time.monotonic() + timeouts.linger
        dropped = 0
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            while dropped < LINGER_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(min(timeouts.linger_idle, left))
                data = sock.recv(LINGER_READ)
                if not data:
                    break
                dropped += len(data)

    def read_body(self) -> ApiError | None:
        """Read the body whole into ``wsgi.input`` within the head timeout; the
        error that refuses it otherwise."""
        env = self.environ
        chunked = "chunked" in env.get("HTTP_TRANSFER_ENCODING", "").lower()
        if not (self.content_length or chunked):
            return None
        refused = self.server.early(env)
        if refused is not None:  # (no `100 Continue`: `wsgi.input` never read)
            return refused
        if (self.content_length or 0) > MAX_BODY:
            return _too_large()
        try:
            with Timeout(self.server.timeouts.client_header, HeadTimeout("body timeout")):
                data = self.wsgi_input.read(MAX_BODY + 1)
        except HeadTimeout:
            return ApiError(408, "request_timeout", "the request body arrived too slowly")
        except (OSError, ValueError) as exc:
            return ApiError(400, "bad_request", "the request body could not be read",
                            [": ".join(map(str, exc.args)) or type(exc).__name__])
        if len(data) > MAX_BODY:
            return _too_large()
        env["wsgi.input"] = io.BytesIO(data)
        env["CONTENT_LENGTH"] = str(len(data))
        env.pop("HTTP_TRANSFER_ENCODING", None)
        return None

    # a draining server's idle connections -----------------------------------
    def close_if_idle(self) -> None:
        """Run by the hub at the drain (`ManagementServer.drain`): end this kept-alive
        connection if it still waits for its next request and no byte of one came
        (`IdleClose` lands in that wait, nowhere else: the handler is not running).
        Bytes that came are a request: answered, with ``Connection: close``."""
        if self.idle and peek_under(self.socket) == OPEN:
            self.task.throw(IdleClose())

    def has_pending(self) -> bool:
        """Whether bytes of a next request came (read ahead, or in the socket)."""
        self.socket.settimeout(0.0)
        try:
            return bool(self.rfile.peek(1))
        except OSError:
            return False

    def close_idle(self) -> str:
        """Close a kept-alive connection between requests, as a lingering close: the
        FIN first, then a request racing it is read and dropped, unanswered and
        never run (the client sees the connection end before any answer, and may
        send it again on a new one), not met with a reset."""
        self.linger()
        return ""

    # helpers ---------------------------------------------------------------
    def refuse(self, ex: Exception) -> str:
        """Answer the head refused for `ex` (best effort); "": the connection closes."""
        with contextlib.suppress(OSError):
            self.socket.sendall(error_bytes(refusal(ex, self.server.max_header_bytes)))
        return ""

    def stop_timer(self) -> None:
        timer, self.head_timer = self.head_timer, None
        if timer is not None:
            timer.close()


def api_connection_cap(limit: int, reserved: int) -> int:
    """The management connections a descriptor `limit` leaves room for, beside the
    `reserved` ones. Bug: under `ulimit -n 64` the cap was 0, so every connection
    (`/healthz` and `balancerctl` too) was closed unanswered."""
    return max(MIN_CONNECTIONS, min(MAX_CONNECTIONS, limit - reserved))


class ManagementServer(RestingServer, WSGIServer):
    """gevent's WSGI server with `ManagementHandler` and the connection cap; out of
    descriptors, it displaces a connection waiting for its head before it rests."""

    handler_class = ManagementHandler
    # gevent accepts up to 100 before any runs `handle`: a flood then ran out of
    # descriptors (a traceback each time) where it should have displaced
    max_accept = 1

    def __init__(self, sock: Any, app: Any, timeouts: Any, max_header_bytes: int,
                 max_connections: int = MAX_CONNECTIONS,
                 early: Callable[[dict[str, Any]], ApiError | None] = lambda env: None
                 ) -> None:
        # SERVER_NAME given: gevent would look it up (`getfqdn`, a resolver thread at
        # each start) for what only a request without a Host header could use
        super().__init__(sock, app, log=None, error_log=log, spawn=Pool(),
                         environ={"SERVER_NAME": server_name(sock)})
        self.early = early  # what refuses a request with a body from its head alone
        self.timeouts = timeouts
        self.max_header_bytes = max_header_bytes
        self.max_connections = max_connections
        self.draining = False  # (`drain`)
        self.open: set[ManagementHandler] = set()
        # connections waiting for a request head, longest waiting first
        self.heads: dict[ManagementHandler, None] = {}

    def handle(self, sock: Any, address: Any) -> None:
        if len(self.open) >= self.max_connections and not self.displace():
            sock.close()
            return
        handler = self.handler_class(sock, address, self)
        self.open.add(handler)
        handler.handle()

    def drain(self) -> None:
        """Stop accepting at once; close each kept-alive connection waiting for its
        next request now, with no request in flight (`close_if_idle`, as nginx and
        Go's servers on a graceful stop), and answer every request that arrived
        with ``Connection: close`` (the client opens a new connection: to the
        successor). The listening socket stays open in the arbiter and the
        successor, which take every new connection (while a replacement starts,
        they wait in its queue). Bugs: a process told to drain went on accepting
        until its drain (the deploys and the issuer stopped first), and kept its
        connections alive to its drain's end, then cut them: requests in flight
        were reset, or not answered; later, an idle kept-alive connection stayed
        open to the drain's end, then was cut wherever it was: a request sent
        then was reset, or run and never answered."""
        self.draining = True
        self.close()
        for handler in list(self.open):
            if handler.idle:
                get_hub().loop.run_callback(handler.close_if_idle)

    remedy = ("closing the connection that has waited longest for a request head at "
              "each accept (or pausing accepts for 0.5 s at a time when none waits)")

    def make_room(self) -> bool:
        return self.displace()

    def displace(self) -> bool:
        """Close the connection that has waited longest for a head; False if none does."""
        if not self.heads:
            return False
        oldest = next(iter(self.heads))
        self.forget(oldest)
        oldest.task.kill(block=False)
        return True

    def waiting(self, handler: ManagementHandler) -> None:
        self.heads.pop(handler, None)
        self.heads[handler] = None

    def busy(self, handler: ManagementHandler) -> None:
        self.heads.pop(handler, None)

    def forget(self, handler: ManagementHandler) -> None:
        self.heads.pop(handler, None)
        self.open.discard(handler)


def server_name(sock: Any) -> str:
    """WSGI's ``SERVER_NAME``: the address `sock` listens on, as it is (werkzeug builds
    the host of a request without a Host header from it)."""
    address = sock.getsockname()
    return str(address[0]) if isinstance(address, tuple) else ""


def framing_problem(headers: Any) -> str:
    """Why a request head frames its body ambiguously ("" when it does not): a
    ``Transfer-Encoding`` other than ``chunked`` alone, one beside a
    ``Content-Length``, or a ``Content-Length`` twice or not digits (RFC 9112 §6).
    Bug: gevent read ``Content-Length: 5`` + ``Content-Length: 40`` as 5,
    ``5_0`` as 50, ``gzip, chunked`` (or ``chunked`` and a space) as no body,
    and kept the connection open after one with both: behind a reverse proxy
    that framed it the other way, the rest of the body was taken as the next
    request (smuggling)."""
    codings = headers.get_all("Transfer-Encoding") or []
    lengths = [value.strip() for value in headers.get_all("Content-Length") or []]
    if codings and (lengths or len(codings) > 1 or codings[0].lower() != "chunked"):
        return "Transfer-Encoding must be chunked alone, without Content-Length"
    if len(lengths) > 1 or (lengths and not (lengths[0].isascii() and lengths[0].isdigit())):
        return "Content-Length must be given once, in digits"
    return ""


def refusal(ex: Exception, max_header_bytes: int) -> ApiError:
    """The error a request head refused for `ex` is answered with. Bug: 414 and
    431 (and a head's 400 and 408) had an empty body, unlike every other error
    of the API."""
    if isinstance(ex, HeadTimeout):
        return ApiError(408, "request_timeout", "the request head arrived more slowly than "
                        "timeouts.client_header allows")
    if isinstance(ex, LineTooLong):
        return ApiError(414, "uri_too_long",
                        f"the request line is longer than {MAX_REQUEST_LINE - 1} bytes")
    if isinstance(ex, HeadTooLarge | http.client.HTTPException):
        return ApiError(431, "headers_too_large",
                        f"the request head is larger than {max_header_bytes} bytes "
                        "(limits.max_header_bytes) or has more than 100 fields")
    return ApiError(400, "bad_request", "the request head is malformed",
                    [str(ex) or type(ex).__name__])


def _too_large() -> ApiError:
    return ApiError(413, "payload_too_large", f"the request body is larger than {MAX_BODY} bytes")
