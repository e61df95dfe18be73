"""The authority of an absolute-form request target (sans-IO): what the balancer
routes such a request by, and the Host its backend gets (docs/proxying.md).

Invariants:
* A valid authority is ``host [":" port]`` with `port` digits (RFC 3986 §3.2.3:
  possibly none), and `host` either an IP literal (RFC 3986 §3.2.2: an IPv6
  address or an IPvFuture, its "v" in any case, in brackets) or a name of letters, digits, ``-`` and
  ``.`` with no empty label but a trailing one (``app.test.``).
* Anything else is refused: userinfo (RFC 9110 §4.2.4), an empty host (RFC 9110
  §4.2.1: "MUST reject"), and the reg-names RFC 3986 allows but no host has:
  sub-delims (``*``, ``a*b``, ``a!b``), ``%``, ``_``. nginx 1.22 refuses those
  in a request line too; HAProxy 2.6 forwards them (both compared on loopback,
  2026-12-06). Bug: ``http://*/`` was forwarded as ``/`` with ``Host: *``.
* A port is digits, at most `MAX_PORT` (leading zeros aside), in a target as in
  a ``Host`` field.
* A request's ``Host`` field keeps its own, wider check of characters
  (`http11.HOST_CHARS`), as with nginx and HAProxy, and `is_valid_host` (read
  by `balancer.table` when it resolves a Host value it has not cached) checks
  its shape: a name of labels none of which is empty but a trailing one
  (``app.test..``, ``app..test``, ``.app.test`` are refused, as nginx 1.22
  refuses the first two), or an IP literal; a port as above (nginx ignores the
  port; HAProxy 2.6 takes any value: both compared on loopback, 2026-12-07).
  Bug: ``app.test..`` and ``app.test:abc`` were routed to ``app.test``.
* `is_valid_host` and `is_valid_authority` cost a few native searches of
  their value, whatever its length (a 60 KB Host is read on each request: no
  key is that long, and it is not cached; an 8 KB target's authority took
  1.5 ms with a regular expression: bug); a Host's IP literal's ``]`` is
  within `MAX_LITERAL` bytes.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

# the bytes of an authority's name (`is_valid_authority`), and the table that maps
# every other byte to NUL (itself not one: a name is valid if its translation has none)
NAME_CHARS: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-."
NOT_NAME_TO_NUL: Final = bytes(b if b in NAME_CHARS else 0 for b in range(256))
# an IP literal (its IPv6 address checked apart), then an optional port
LITERAL: Final = re.compile(
    rb"\[(?:([0-9A-Fa-f:.]{1,45})|[vV][0-9A-Fa-f]+\.[A-Za-z0-9._~!$&'()*+,;=:-]+)\](?::([0-9]*))?")
MAX_PORT: Final = 65535
DOT: Final = ord(".")
LEFT_BRACKET: Final = ord("[")
RIGHT_BRACKET: Final = ord("]")
# where an IP literal's "]" is at the latest in a Host: an IPv6 address is at most
# 45 bytes, and an IPvFuture longer than a name (253) names no host anyone has
MAX_LITERAL: Final = 255


def is_valid_authority(authority: bytes) -> bool:
    """Whether `authority` (an absolute-form target's, as it came) names a host
    (module doc): an IP literal (`LITERAL`), or a name of labels of `NAME_CHARS`,
    none empty but a trailing one, and a port of digits or none. Native searches,
    as `is_valid_host` (the regular expression it replaced, kept in
    tests/test_host_values.py, took 1.5 ms for 8 KB: bug)."""
    if authority[:1] == b"[":
        return _is_literal(authority)
    name, colon, port = authority.partition(b":")
    if not name or name[0] == DOT or b".." in name or 0 in name.translate(NOT_NAME_TO_NUL):
        return False
    return not colon or not port or (port.isdigit() and _is_port(port))


def is_valid_host(host: bytes) -> bool:
    """Whether a Host field's value names a host (module doc); empty is valid (an
    HTTP/1.0 request without one: the parser refuses an empty field). A name is
    checked with a few searches, each a native loop (a regular expression took
    10-30 ms for a 60 KB Host: bug), an IP literal by `LITERAL` (`_is_literal`)."""
    if not host:
        return True
    if host[0] == LEFT_BRACKET:  # (past MAX_LITERAL, no IP literal: not searched)
        return host.find(b"]", 0, MAX_LITERAL) > 0 and _is_literal(host)
    name, colon, port = host.partition(b":")
    if (not name or name[0] == DOT or b".." in name or LEFT_BRACKET in name
            or RIGHT_BRACKET in name):
        return False
    return not colon or not port or (port.isdigit() and _is_port(port))


def _is_literal(value: bytes) -> bool:
    """Whether `value` is an IP literal (`LITERAL`), then a port or none."""
    literal = LITERAL.fullmatch(value)
    if literal is None:
        return False
    address = literal.group(1)
    if address is not None:  # (else an IPvFuture)
        try:
            ipaddress.IPv6Address(address.decode("ascii"))
        except ValueError:  # ("[1.2.3.4]", "[::1::2]")
            return False
    return _is_port(literal.group(2))


def _is_port(digits: bytes | None) -> bool:
    """Whether a port's digits (None: no port; empty: none given) are at most
    `MAX_PORT` (bug: a Host ``app.test:99999`` was routed)."""
    if not digits:
        return True
    digits = digits.lstrip(b"0")
    return len(digits) <= 5 and int(digits or b"0") <= MAX_PORT
