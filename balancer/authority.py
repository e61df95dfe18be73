"""The authority of an absolute-form request target (sans-IO): what the balancer
routes such a request by, and the Host its backend gets (docs/proxying.md).

Invariants:
* A valid authority is ``host [":" port]`` with `port` digits (RFC 3986 §3.2.3:
  possibly none), and `host` either an IP literal (RFC 3986 §3.2.2: an IPv6
  address or an IPvFuture in brackets) or a name of letters, digits, ``-`` and
  ``.`` with no empty label but a trailing one (``app.test.``).
* Anything else is refused: userinfo (RFC 9110 §4.2.4), an empty host (RFC 9110
  §4.2.1: "MUST reject"), and the reg-names RFC 3986 allows but no host has:
  sub-delims (``*``, ``a*b``, ``a!b``), ``%``, ``_``. nginx 1.22 refuses those
  in a request line too; HAProxy 2.6 forwards them (both compared on loopback,
  2026-12-06). Bug: ``http://*/`` was forwarded as ``/`` with ``Host: *``.
* Only absolute-form targets come here: a request's ``Host`` field keeps its
  own, wider check (`http11.HOST_CHARS`), as with nginx and HAProxy.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

# a name, then an optional port
NAME: Final = re.compile(rb"(?:[A-Za-z0-9-]+\.)*[A-Za-z0-9-]+\.?(?::[0-9]*)?")
# an IP literal (its IPv6 address checked apart), then an optional port
LITERAL: Final = re.compile(
    rb"\[(?:([0-9A-Fa-f:.]+)|v[0-9A-Fa-f]+\.[A-Za-z0-9._~!$&'()*+,;=:-]+)\](?::[0-9]*)?")


def is_valid_authority(authority: bytes) -> bool:
    """Whether `authority` (an absolute-form target's, as it came) names a host."""
    if NAME.fullmatch(authority):
        return True
    literal = LITERAL.fullmatch(authority)
    if literal is None:
        return False
    address = literal.group(1)
    if address is None:  # IPvFuture
        return True
    try:
        ipaddress.IPv6Address(address.decode("ascii"))
    except ValueError:  # ("[1.2.3.4]", "[::1::2]")
        return False
    return True
