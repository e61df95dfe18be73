"""Who a client is, for the per-rule limits (`balancer.limits`) and the heavy
hitters (`balancer.sketch`): one key for both, so the client a limit holds
back is the one `/api/v1/top` names.

Invariants:
* An IPv4 address is its own key; an IPv6 address is keyed by its /64, written
  ``2001:db8:1:2::/64``: the smallest block a network hands one subscriber
  (RFC 6177), whose 2**64 addresses are one client (bug: the limits keyed them
  so, the heavy hitters by address, so a host rotating its addresses within
  its /64 was one limited client but spread thin over the top clients); an
  IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) is keyed by its IPv4 address.
  Anything else (a zone id, what a front proxy sent that is no address) is
  its own key, as it is.
* A connection's key is made once, when it is accepted
  (`ClientConnection.client_key`): the hot path reads it.
"""

from __future__ import annotations

import socket
from typing import Final

V4_MAPPED: Final = bytes(10) + b"\xff\xff"  # ::ffff:a.b.c.d
HOST_PART: Final = bytes(8)  # the last 64 bits of an IPv6 address, zeroed in its /64


def client_key(client: str) -> str:
    """The key of `client` (an address, or what a trusted front proxy said)."""
    if ":" not in client:
        return client
    try:
        packed = socket.inet_pton(socket.AF_INET6, client)
    except OSError:  # a zone id, or no address at all
        return client
    if packed[:12] == V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + HOST_PART) + "/64"
