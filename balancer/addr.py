"""Network addresses as users write them: ``host:port``, ``[v6]:port``, ``:port``.

Invariants kept by this module:

* an ``Address`` host never carries brackets; an IPv6 literal is stored bare
  (``::1``) and bracketed again only by ``str()``;
* a host is either an IPv4 literal, an IPv6 literal, or a DNS name made of
  letters, digits, ``-``, ``_`` and ``.`` (no spaces, no scheme, no path);
* ``:port`` (all interfaces) is stored as host ``0.0.0.0``;
* only a backend address may say ``https://`` (`Address.tls`: the balancer
  speaks TLS to it); ``str()`` gives it back with the scheme, so the text is
  the backend's key everywhere (pools, statistics, rules).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

ALL_INTERFACES = "0.0.0.0"
HTTPS = "https://"  # the one scheme a backend address may carry

HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252}[A-Za-z0-9_.])?")
_DOTTED_DIGITS = re.compile(r"[0-9.]+")
_FORMS = "host:port, [v6]:port or :port"


class AddrError(ValueError):
    """An address that cannot be parsed; the message names the text and the problem."""


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port. ``host`` is an IP literal or a DNS name, never bracketed."""

    host: str
    port: int
    tls: bool = False  # a backend reached over TLS (``https://host:port``)

    @property
    def family(self) -> socket.AddressFamily:
        """``AF_INET6`` for an IPv6 literal, ``AF_INET`` otherwise."""
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def is_loopback(self) -> bool:
        """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        scheme = HTTPS if self.tls else ""
        if ":" in self.host:
            return f"{scheme}[{self.host}]:{self.port}"
        return f"{scheme}{self.host}:{self.port}"


def parse_addr(text: str) -> Address:
    """Parse a listen address: ``host:port``, ``[v6]:port`` or ``:port`` (port 0..65535).

    ``:port`` means all interfaces and gives host ``0.0.0.0``.
    """
    host, port_text = _split(text)
    port = _parse_port(text, port_text, minimum=0)
    if host == "":
        return Address(ALL_INTERFACES, port)
    return Address(host, port)


def parse_backend_addr(text: str, allow_tls: bool = True) -> Address:
    """Parse a backend address: ``host:port`` or ``[v6]:port``, either one after
    ``https://`` (with `allow_tls`); host required, port 1..65535."""
    tls = allow_tls and isinstance(text, str) and text[:len(HTTPS)].lower() == HTTPS
    rest = text[len(HTTPS):] if tls else text
    if tls and ":" not in rest.rpartition("]")[2]:
        rest += ":443"  # https:// without a port: HTTPS's own
    if isinstance(rest, str) and "://" in rest:
        raise AddrError(f"invalid backend address {text!r}: the only scheme a backend takes "
                        f"is https:// (a plain HTTP backend is just host:port)")
    host, port_text = _split(rest)
    if host == "":
        raise AddrError(f"invalid backend address {text!r}: a host is required (host:port)")
    port = _parse_port(text, port_text, minimum=1)
    return Address(host, port, tls)


def _split(text: str) -> tuple[str, str]:
    """Split ``text`` into a validated host ('' when absent) and the raw port text."""
    if not isinstance(text, str):
        raise AddrError(f"invalid address {text!r}: expected a string like {_FORMS}")
    if "/" in text:
        raise AddrError(f"invalid address {text!r}: no scheme or path allowed (expected {_FORMS})")
    if text.startswith("["):
        return _split_bracketed(text)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise AddrError(f"invalid address {text!r}: missing ':port' (expected {_FORMS})")
    if ":" in host:
        raise AddrError(f"invalid address {text!r}: an IPv6 host must be in brackets, [v6]:port")
    if host and not _is_valid_host(host):
        short = _shorthand_of(host)
        if short is not None:
            raise AddrError(f"invalid address {text!r}: {host!r} is another spelling of the "
                            f"IPv4 address {short} (the system resolver reads it so, and "
                            f"connects to {short}); write {short}")
        raise AddrError(f"invalid address {text!r}: {host!r} is not a valid host name or IP")
    return host, port_text


def _split_bracketed(text: str) -> tuple[str, str]:
    inside, sep, rest = text[1:].partition("]")
    if not sep or not rest.startswith(":"):
        raise AddrError(f"invalid address {text!r}: expected [v6]:port")
    try:
        ipaddress.IPv6Address(inside)
    except ValueError:
        raise AddrError(f"invalid address {text!r}: {inside!r} is not an IPv6 address") from None
    return inside, rest[1:]


def _is_valid_host(host: str) -> bool:
    """An IPv4 literal or a DNS name; all-digit dotted text must be a real IPv4 address,
    and no name may be one the system resolver reads as an address (`_shorthand_of`)."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return HOSTNAME.fullmatch(host) is not None and not _DOTTED_DIGITS.fullmatch(host) \
            and _shorthand_of(host) is None
    return True


def _shorthand_of(host: str) -> str | None:
    """The IPv4 address `host` is in one of inet_aton's short forms (``127.1``,
    ``127.0.1``, ``0x7f.1``, ``2130706433``, ``0177.0.0.1``), or None. The system
    resolver (getaddrinfo, which the data plane, the health checks and the deploy's
    checks use) takes such text for that address, never looks it up as a name (bug:
    ``0x7f.1`` passed as a name, and a deploy from ``127.0.0.1:P`` to ``0x7f.1:P``
    drained, and reported safe to stop, the server that served on)."""
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


def full_spelling(text: object) -> str | None:
    """The backend address `text` written in full when its host is one of inet_aton's
    short IPv4 forms an earlier version stored as a name, the hexadecimal ones
    (``0x7f.1:80`` → ``127.0.0.1:80``, the scheme kept), else None: for tables stored
    before they were refused (`balancer.stores.floors`). The all-digit forms
    (``127.1``) were refused already. (Checked at every rule's load: the ``x`` test
    first keeps it to a substring search for every other address.)"""
    if not isinstance(text, str) or ("x" not in text and "X" not in text):
        return None
    scheme = text[:len(HTTPS)] if text[:len(HTTPS)].lower() == HTTPS else ""
    host, sep, port = text[len(scheme):].rpartition(":")
    if not sep and scheme:  # https://host: HTTPS's own port
        host, port = port, ""
    if not HOSTNAME.fullmatch(host):
        return None
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        short = _shorthand_of(host)
        return None if short is None else f"{scheme}{short}{sep}{port}"
    return None


def _parse_port(text: str, port_text: str, minimum: int) -> int:
    # isdecimal() alone would accept non-ASCII digits; require plain 0-9.
    if not (port_text.isascii() and port_text.isdecimal()) or len(port_text) > 5:
        raise AddrError(f"invalid address {text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not minimum <= port <= 65535:
        raise AddrError(f"invalid address {text!r}: port must be {minimum}..65535, got {port}")
    return port
