"""Serialising responses the balancer makes itself (pages, redirects, errors).

One place builds a local response: status line, Date, Content-Type,
Content-Length (always correct), X-Request-Id, the Connection header and
any extra headers.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_date_cache: list = [0, b""]


def reason(status: int) -> bytes:
    """The standard reason phrase of `status` (b"Unknown" when it has none)."""
    return _REASONS.get(status, b"Unknown")


def http_date() -> bytes:
    """The current IMF-fixdate, recomputed at most once per second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True).encode()
    return _date_cache[1]


def connection_header(keep_alive: bool, version: bytes) -> bytes:
    """The Connection header line for a response, or b"" when none is needed."""
    if not keep_alive:
        return b"Connection: close\r\n"
    if version == b"1.0":
        return b"Connection: keep-alive\r\n"
    return b""


def local_response(status: int, body: bytes, content_type: bytes, *, request_id: bytes,
                   keep_alive: bool, version: bytes = b"1.1", head_only: bool = False,
                   extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A complete response: head, and body unless `head_only`."""
    lines = [b"HTTP/1.1 %d %s\r\nDate: %s\r\n" % (status, reason(status), http_date())]
    if status == 205:  # Reset Content: never content (RFC 9110 §15.3.6)
        body = b""
    if status not in (204, 304):
        if content_type:
            lines.append(b"Content-Type: %s\r\n" % content_type)
        lines.append(b"Content-Length: %d\r\n" % len(body))
    lines.extend(b"%s: %s\r\n" % pair for pair in extra)
    if request_id:
        lines.append(b"X-Request-Id: %s\r\n" % request_id)
    lines.append(connection_header(keep_alive, version))
    lines.append(b"\r\n")
    if not head_only and status not in (204, 304):
        lines.append(body)
    return b"".join(lines)
