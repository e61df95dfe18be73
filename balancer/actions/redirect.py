"""`redirect`: answer with a Location, optionally keeping the request path and query."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from balancer.actions.local import LocalAction


class RedirectAction(LocalAction):
    """`Location` is `to`, plus the request target when `keep_path` is true."""

    def __init__(self, rule: Mapping[str, Any]) -> None:
        self.rule = rule
        self.status = rule.get("status", 302)
        self.keep_path = rule.get("keep_path", False)
        to = rule["to"].encode()
        self.to = to.rstrip(b"/") if self.keep_path else to

    def handle(self, ex: Any) -> None:
        target = ex.head.target
        if not self.keep_path:
            location = self.to
        elif target == b"*":  # OPTIONS *: no path to keep (bug: "https://example.com*")
            location = self.to + b"/"
        elif self.to:
            location = self.to + target
        else:  # `to` "/": a target "//evil.example/x" must not become a host, nor
            # "/\\evil.example/x" (browsers read a backslash as a slash)
            location = b"/" + target.lstrip(b"/\\")
        ex.respond(self.status, b"", b"", ((b"Location", location),))
