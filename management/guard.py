"""What keeps web pages out of the management API (SPEC §5): Host, Origin, Content-Type.

A browser will send a request to the management address (loopback by
default) for any page it shows. `Guard` wraps the management app and refuses,
before the app sees them (and before the token is checked):

* a ``Host`` the management address does not answer to: 403
  ``host_not_allowed``. This stops DNS rebinding, where a page's own name is
  re-pointed at 127.0.0.1 and the browser treats the API as that page's
  origin. Answered to: the bound IP; with a loopback bind also ``localhost``
  and every loopback IP; with a wildcard bind any IP literal (a rebinding
  page has a DNS name) and ``localhost``; and `[management] allowed_hosts`
  (``name``, ``.domain`` for it and its subdomains, ``*`` for any). The port
  is not compared (a published or forwarded port differs from the bound one).
  A request without ``Host`` (HTTP/1.0 tools) passes: browsers always send it.
* a cross-origin request: an ``Origin`` other than the ``Host`` it was sent
  to (``null`` included), or ``Sec-Fetch-Site: cross-site`` / ``same-site``
  (another port of the same host is same-site): 403 ``cross_origin``.
  Same-origin requests from the dashboard carry the management origin.
* a write (POST, PUT, PATCH, DELETE) with a ``Content-Type`` other than
  ``application/json``, or with a body and no ``Content-Type``: 415
  ``unsupported_media_type``. HTML forms and ``no-cors`` fetches can only send
  form or text types, and a JSON body from a page needs a CORS preflight that
  is never granted. A bodyless write (``curl -X DELETE``) needs no type.
* a declared ``Content-Length`` over `MAX_BODY`: 413 ``payload_too_large``,
  before a byte of it is read.

Refusals are the app's own error shape, ``{"error", "message", "details"}``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from werkzeug.wrappers import Request

from management.http import MAX_BODY, ApiError, error_response

WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CROSS_SITES = frozenset({"cross-site", "same-site"})
DEFAULT_PORTS = {"http": 80, "https": 443}


class HostPolicy:
    """Which ``Host`` names the management address answers to."""

    def __init__(self, bound_host: str, allowed: Iterable[str] = ()) -> None:
        self.allowed = frozenset(allowed)
        self.bound = _ip(bound_host)
        self.wildcard = self.bound is not None and self.bound.is_unspecified
        self.loopback = bound_host == "localhost" or (
            self.bound is not None and self.bound.is_loopback)
        self.bound_name = bound_host.lower()

    def allows(self, name: str) -> bool:
        """True when `name` (a Host header's name, lower case, no port) may be served."""
        if "*" in self.allowed or name in self.allowed or name == self.bound_name:
            return True
        if any(entry.startswith(".") and (name == entry[1:] or name.endswith(entry))
               for entry in self.allowed):
            return True
        ip = _ip(name)
        if ip is None:
            return name == "localhost" and (self.loopback or self.wildcard)
        return self.wildcard or ip == self.bound or (self.loopback and ip.is_loopback)


class Guard:
    """WSGI middleware: the browser rules above, then the wrapped app."""

    def __init__(self, app: Callable[..., Iterable[bytes]], hosts: HostPolicy) -> None:
        self.app = app
        self.hosts = hosts

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        refusal = self.refusal(environ)
        if refusal is not None:
            return error_response(refusal)(environ, start_response)
        return self.app(environ, start_response)

    def refusal(self, environ: dict[str, Any]) -> ApiError | None:
        """The error that refuses this request, or None to serve it."""
        host = environ.get("HTTP_HOST")
        authority = split_authority(host) if host is not None else None
        if host is not None and (authority is None or not self.hosts.allows(authority[0])):
            return ApiError(403, "host_not_allowed",
                            f"Host {host!r} is not an address of this management API; "
                            "add the name to [management] allowed_hosts to use it")
        problem = _cross_origin(environ, authority)
        if problem:
            return ApiError(403, "cross_origin", problem)
        return _body_problem(environ)


def guard_for(app: Callable[..., Iterable[bytes]], settings: Any) -> Guard:
    """`app` behind the rules, for `settings`' management address and allowed names."""
    management = settings.management
    return Guard(app, HostPolicy(management.listen.host, management.allowed_hosts))


def split_authority(value: str) -> tuple[str, int | None] | None:
    """``(name, port)`` of a Host value (name lower case, IPv6 bare, no trailing
    dot), or None when it is not a host name."""
    text = value.strip().lower()
    if text.startswith("["):
        name, sep, rest = text[1:].partition("]")
        if not sep or _ip(name) is None:
            return None
        port_text = rest[1:] if rest.startswith(":") else rest
    else:
        name, _, port_text = text.partition(":")
    if port_text and not (port_text.isascii() and port_text.isdecimal() and len(port_text) < 6):
        return None
    name = name.rstrip(".")
    if not name or any(ch in name for ch in " /\\@?#%"):
        return None
    return name, int(port_text) if port_text else None


def _cross_origin(environ: dict[str, Any], authority: tuple[str, int | None] | None) -> str:
    site = environ.get("HTTP_SEC_FETCH_SITE", "").lower()
    if site in CROSS_SITES:
        return f"a {site} request from a web page (Sec-Fetch-Site: {site}) is refused"
    origin = environ.get("HTTP_ORIGIN")
    if origin is None:
        return ""
    if authority is None or not _same_origin(origin, authority):
        return f"a request from the web page at Origin {origin!r} is refused (cross-origin)"
    return ""


def _same_origin(origin: str, authority: tuple[str, int | None]) -> bool:
    try:
        parts = urlsplit(origin.strip())
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return False
    if parts.scheme not in DEFAULT_PORTS or parts.hostname is None:
        return False
    name, host_port = authority
    return (parts.hostname.rstrip(".") == name
            and (host_port or DEFAULT_PORTS[parts.scheme]) == port)


def _body_problem(environ: dict[str, Any]) -> ApiError | None:
    request = Request(environ)
    length = request.content_length
    if length is not None and length > MAX_BODY:
        return ApiError(413, "payload_too_large",
                        f"the request body is larger than {MAX_BODY} bytes")
    if environ.get("REQUEST_METHOD", "GET").upper() not in WRITES:
        return None
    has_body = bool(length) or "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    kind = request.mimetype
    if kind == "application/json" or (not kind and not has_body):
        return None
    given = f"Content-Type {request.content_type!r}" if kind else "no Content-Type"
    return ApiError(415, "unsupported_media_type",
                    f"a write needs Content-Type: application/json (got {given})")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
