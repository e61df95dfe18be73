"""An access log record: a plain tuple, one per request, in this field order.

Build it with `make_record` or as a literal in the same order (the request
path does, `balancer.connection.log_access`); text fields take ``str``,
``bytes`` or ``None``::

    TIME            float, time.time() when the request head arrived
    CLIENT          client IP address
    HOST            Host of the request, as routed
    METHOD, TARGET, PROTOCOL    e.g. "GET", "/a?b=1", "HTTP/1.1"
    STATUS          int status sent to the client
    BYTES_SENT      int bytes sent to the client (head and body)
    BYTES_RECEIVED  int request body bytes received from the client (chunked framing
                    removed; the head is not counted), plus what it sent through a tunnel
    REFERER, USER_AGENT         request header values, or None
    REQUEST_ID      the X-Request-Id used
    BACKEND         backend address ("10.0.0.5:9001"), or None if none was used
    DURATION        float seconds from request head to the last byte sent
    BACKEND_TIME    float seconds spent waiting on the backend, or None
"""

from __future__ import annotations

from typing import Final

TIME: Final = 0
CLIENT: Final = 1
HOST: Final = 2
METHOD: Final = 3
TARGET: Final = 4
PROTOCOL: Final = 5
STATUS: Final = 6
BYTES_SENT: Final = 7
BYTES_RECEIVED: Final = 8
REFERER: Final = 9
USER_AGENT: Final = 10
REQUEST_ID: Final = 11
BACKEND: Final = 12
DURATION: Final = 13
BACKEND_TIME: Final = 14
FIELD_COUNT: Final = 15


def make_record(
    started: float, client: str, host: str | bytes | None, method: str | bytes | None,
    target: str | bytes | None, protocol: str | bytes | None, status: int, bytes_sent: int,
    bytes_received: int,
    referer: str | bytes | None, user_agent: str | bytes | None, request_id: str | bytes | None,
    backend: str | None, duration: float, backend_time: float | None,
) -> tuple:
    """Build a record tuple in the documented field order."""
    return (started, client, host, method, target, protocol, status, bytes_sent, bytes_received,
            referer, user_agent, request_id, backend, duration, backend_time)


def held_bytes(record: tuple) -> int:
    """The bytes of its request a record keeps (`AccessLog.log`'s `held`): its
    host, target, referer, user agent and request id, which a client chooses;
    the rest is a few hundred bytes of every record. The request path adds the
    same lengths itself, from the values it has (`connection.log_access`)."""
    return sum(len(record[field]) for field in (HOST, TARGET, REFERER, USER_AGENT, REQUEST_ID)
               if record[field] is not None)


def refused_record(started: float, client: str, status: int, bytes_sent: int,
                   request_id: str | bytes) -> tuple:
    """The record of a request refused before its head was read as one (a
    malformed head, plain HTTP on a TLS port): its client, status, bytes sent
    and request id; its host, request line, referer and user agent missing,
    never its raw bytes."""
    return make_record(started, client, host=None, method=None, target=None, protocol=None,
                       status=status, bytes_sent=bytes_sent, bytes_received=0, referer=None,
                       user_agent=None, request_id=request_id, backend=None, duration=0.0,
                       backend_time=None)
