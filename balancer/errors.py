"""The error family of the data plane.

Socket errors are mapped into these classes at the edge where they happen
(`balancer.pool`, `balancer.relay`); actions never inspect errno. The client
connection handler turns a `ProxyError` into a page in exactly one place.
"""

from __future__ import annotations


class ProxyError(Exception):
    """A request that ends with a built-in page; `page` names it. A 502/504
    carries its `cause` for the operator log's once-a-second summary."""

    page = "bad-gateway"
    retry_after: int | None = None
    cause = ""  # set on the gateway failures (502/504) the operator log counts


class ConnectError(ProxyError):
    """No connection to a backend could be made (nothing was sent)."""

    cause = "connect failed"


class BackendTLSError(ConnectError):
    """The TLS handshake with an https:// backend failed: an untrusted or
    misnamed certificate, a protocol error or a timeout (nothing was sent)."""

    cause = "backend TLS failed"


class ResolveError(ConnectError):
    """A backend's host name gave no usable address within the connect timeout:
    no such name, a server failure, no answer, an answer of no usable address
    (`balancer.resolve`; nothing was sent)."""

    cause = "DNS lookup failed"


class BackendClosed(ProxyError):
    """The backend closed or reset the connection before the response was complete."""

    cause = "backend closed the connection"


class BackendProtocolError(ProxyError):
    """The backend answered something that is not valid HTTP/1.x."""

    cause = "invalid response"


class BackendAnswered(Exception):
    """The backend answered before the request body was all sent (a complete
    response, an early error, or an answer that closes: `balancer.relay`): the
    body is cut there and that response relayed. Never leaves the relay."""


class HubFault(ProxyError):
    """A bug in a step of a request served in the hub (`balancer.inline._fault`):
    the try on its backend connection fails with a 502. Not the backend's
    failure (not counted against it), not retried."""


class SelfLoop(ProxyError):
    """A new backend connection reached one of the worker's own listeners
    (`balancer.selves`; nothing was sent): the rule forwards to the balancer
    itself. A 502 with its own cause, not the backend's failure (not counted
    against it, its health untouched), not retried, never held."""

    cause = "backend is this balancer (loop)"


class BackendTimeout(ProxyError):
    """The backend did not answer within `backend_read`."""

    page = "timeout"
    cause = "backend timeout"


class ConnectOverdue(ProxyError):
    """The client connection's own deadline (`ClientConnection.arm`, enforced by
    the watchdog: `Overdue`) passed while a connection to the backend was
    still being made, before the backend's connect timeout. A new connection
    arms it to the connect timeout and a margin, from the clock
    (`balancer.relay.arm_connect`), and an `Overdue` that comes once the
    connect's own timeout passed too (a stalled loop ran the watchdog first)
    is that timeout, the backend's failure (`balancer.pool.Backend._overdue`):
    so this is only a deadline that passed while the connect still had time
    (one not armed for it): a 504 as a backend timeout, but
    not the backend's failure (not counted against it, its health untouched),
    not retried on another backend, never held (`spin_when_down`): the
    request is out of time, not its backend out of service. Nothing was
    sent."""

    page = "timeout"
    cause = "deadline passed while connecting"


class SpinTimeout(ProxyError):
    """A held request was still spinning at its timeout."""

    page = "timeout"
    cause = "held until its timeout"

    def __init__(self, retry_after: int) -> None:
        super().__init__("spin timeout")
        self.retry_after = retry_after


class Busy(ProxyError):
    """Too many requests are held (spin cap)."""

    page = "busy"
    retry_after = 5


class ShuttingDown(ProxyError):
    """The worker is stopping: a held request is answered at once, never cut."""

    page = "maintenance"
    retry_after = 5


class PayloadTooLarge(ProxyError):
    """The request body exceeds the rule's `max_body_bytes`."""

    page = "payload-too-large"


class Overdue(TimeoutError):
    """The watchdog's TimeoutError (`balancer.netio.GeventIO.expire`): a client
    connection's own deadline passed, thrown into the greenlet serving it
    wherever it waits. A wait with a timeout of its own (a backend connect's)
    tells the two apart by this class, only once one is raised
    (`balancer.pool`). (Here, not in the compiled `netio`: mypyc compiles no
    subclass of TimeoutError.)"""


class RenegotiationRefused(OSError):
    """A TLS 1.2 backend asked for a renegotiation, which was refused
    (`balancer.backend_tls._watch`): raised by the read that met the end of
    the stream that follows (`balancer.netio.TLSStream.ended`). (Here, not in
    the compiled `netio`: mypyc compiles no subclass of OSError.)"""

    def __init__(self) -> None:
        super().__init__("TLS: the backend asked for a renegotiation (renegotiation is refused)")


class ClientGone(Exception):
    """The client closed, reset or stalled its connection: nothing more can be sent.
    `status`: what its request counts as when no answer began: 499 (the client
    left), 408 (it sent nothing of its request body for `client_idle`: closed
    with no answer, as nginx's `client_body_timeout`)."""

    def __init__(self, reason: str, status: int = 499) -> None:
        super().__init__(reason)
        self.status = status
