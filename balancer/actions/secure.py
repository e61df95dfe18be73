"""`https_redirect` and `hsts`: what a rule asks of plain and TLS connections.

Wraps the rule's own action only when the rule has one of the fields, so
other rules pay nothing per request.

* ``"https_redirect": true``: a request on a plain listener gets a 308 to the
  same host (port 443, the client's port dropped) and target on HTTPS; ACME
  HTTP-01 challenge paths (``/.well-known/acme-challenge/``) are not
  redirected, so a CA can still reach them over plain HTTP. ``OPTIONS *`` (no
  path) goes to ``https://HOST/``, as HAProxy's ``redirect scheme https``
  sends it (bug: ``Location: https://HOST*``, not a URL).
* ``"hsts": SECONDS``: responses on TLS listeners carry
  ``Strict-Transport-Security: max-age=SECONDS`` (never on plain HTTP, as
  RFC 6797 §7.2 requires).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from balancer.spans import Piece

ACME_PATH = b"/.well-known/acme-challenge/"


class SecureAction:
    """The rule's action behind the https_redirect / hsts checks."""

    def __init__(self, rule: Mapping[str, Any], inner: Any) -> None:
        self.rule = rule
        self.inner = inner
        self.redirect = bool(rule.get("https_redirect", False))
        hsts = rule.get("hsts")
        self.hsts = (b"\r\nStrict-Transport-Security: max-age=%d" % hsts
                     if hsts is not None else b"")

    def handle(self, ex: Any) -> None:
        if self.secured(ex):
            self.inner.handle(ex)

    def resume(self, ex: Any, body: Piece) -> None:
        if self.secured(ex):
            self.inner.resume(ex, body)

    def secured(self, ex: Any) -> bool:
        """False when the request was answered here (a redirect to HTTPS)."""
        if ex.conn.ctx.scheme == b"https":
            ex.head_extra = self.hsts
            return True
        head = ex.head
        if not self.redirect or head.target.startswith(ACME_PATH):
            return True
        host = (head.host or b"").rpartition(b":")[0] if _has_port(head.host) else head.host
        if not host:
            return True  # no Host to redirect to (HTTP/1.0): served as is
        target = head.target if head.target != b"*" else b"/"  # OPTIONS *: no path
        ex.respond(308, b"", b"", ((b"Location", b"https://" + host + target),))
        return False

    def backend_keys(self) -> Iterable[str]:
        return self.inner.backend_keys()


def _has_port(host: bytes | None) -> bool:
    """Whether a Host value ends with :PORT (an IPv6 literal without a port does not)."""
    if not host:
        return False
    name, colon, port = host.rpartition(b":")
    return bool(colon) and port.isdigit() and (not name.startswith(b"[") or name.endswith(b"]"))


def secure(rule: Mapping[str, Any], action: Any) -> Any:
    """`action`, wrapped when the rule has https_redirect or hsts."""
    if rule.get("https_redirect") or "hsts" in rule:
        return SecureAction(rule, action)
    return action


def core(action: Any) -> Any:
    """The rule's own action under a `SecureAction` (held requests compare it)."""
    return action.inner if isinstance(action, SecureAction) else action
