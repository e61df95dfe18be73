"""`static`: a fixed response, from `body` or a named page."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from balancer.actions.local import LocalAction

DEFAULT_TYPE = "text/html; charset=utf-8"


class StaticAction(LocalAction):
    """Answers every request with the same status, type and body."""

    def __init__(self, rule: Mapping[str, Any], pages: Any) -> None:
        self.rule = rule
        if "page" in rule:
            page = pages.get(rule["page"])
            self.status = rule.get("status", page.status)
            self.body, self.content_type = page.body, page.content_type
        else:
            self.status = rule.get("status", 200)
            self.body = rule["body"].encode()
            self.content_type = rule.get("content_type", DEFAULT_TYPE).encode()

    def handle(self, ex: Any) -> None:
        ex.respond(self.status, self.body, self.content_type)
