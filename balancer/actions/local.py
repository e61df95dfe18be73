"""What the actions that answer by themselves (`static`, `redirect`, `empty`) share."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from balancer.spans import Piece


class LocalAction:
    """An action that answers without a backend and never holds a request."""

    def handle(self, ex: Any) -> None:
        raise NotImplementedError

    def resume(self, ex: Any, body: Piece) -> None:
        """A request handed over from a hold: its body is not needed here."""
        self.handle(ex)

    def backend_keys(self) -> Iterable[str]:
        return ()
