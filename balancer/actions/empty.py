"""`empty`: a bodyless response with the rule's status."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from balancer.actions.local import LocalAction


class EmptyAction(LocalAction):
    """Answers with `status` and no body (Content-Length: 0)."""

    def __init__(self, rule: Mapping[str, Any]) -> None:
        self.rule = rule
        self.status = rule["status"]

    def handle(self, ex: Any) -> None:
        ex.respond(self.status, b"", b"")
