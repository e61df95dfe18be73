"""Conditional reads of the table (RFC 9110 §13.1.2 ``If-None-Match``) and the
last table read, kept with its encoded answer.

Invariants:
* The table's entity tag is ``"N"``, its version (`management.http.version_headers`);
  within one store a version names one table (versions only grow), so a client
  holding version N holds the table. ``If-None-Match`` uses the weak comparison:
  ``W/"N"`` and ``"N"`` both match version N; ``*`` matches any table; a tag is
  compared as text (``"012"`` is not version 12, a tag of another server never
  matches).
* A malformed header is 400 `invalid_header`. A header is read in time linear
  in its length (bounded by the listener's ``limits.max_header_bytes``),
  however many tags or empty members it lists.
* `TableCache` keeps one table, read from the store without a problem, and its
  ``GET /api/v1/hosts`` body, encoded at most once per table kept.
"""

from __future__ import annotations

import re
from typing import Any

from werkzeug.wrappers import Request, Response

from balancer.stores import TableData
from management.http import ApiError, encode_json

# empty list members, then one entity-tag (or none), then a comma or the end
_MEMBER = re.compile(r'[ \t,]*(?:(?:W/)?"([\x21\x23-\x7e\x80-\xff]*)"[ \t]*)?(?:,|\Z)')
SHOWN = 60  # characters of a bad header quoted in the error


def none_match(request: Request, version: int) -> bool:
    """Whether the request's ``If-None-Match`` names `version` (or is ``*``): the
    answer is then 304 Not Modified. False without the header."""
    value = request.headers.get("If-None-Match")
    if value is None:
        return False
    if value.strip(" \t") == "*":
        return True
    return str(version) in _tags(value)


def _tags(value: str) -> set[str]:
    tags: set[str] = set()
    at = 0
    while at < len(value):
        member = _MEMBER.match(value, at)
        if member is None or member.end() == at:
            shown = value if len(value) <= SHOWN else f"{value[:SHOWN]}... ({len(value)} " \
                                                      f"characters)"
            raise ApiError(400, "invalid_header",
                           f'If-None-Match: expected "*" or entity tags such as "12" or '
                           f'W/"12" separated by commas, got {shown!r}')
        if member.group(1) is not None:
            tags.add(member.group(1))
        at = member.end()
    return tags


def not_modified(headers: dict[str, str]) -> Response:
    """304 with the headers a 200 would carry about the representation, and no body."""
    response = Response(status=304)
    response.headers["Cache-Control"] = "no-store"
    for name, value in headers.items():
        response.headers[name] = value
    return response


class TableCache:
    """The last table read from the store (without a problem), and its encoded
    ``{"version", "hosts"}`` body. Versions only grow: a table at the version the
    store is at now is the table the store holds."""

    def __init__(self) -> None:
        self.data: TableData | None = None
        self._body: bytes | None = None

    def at(self, version: int) -> TableData | None:
        """The table kept, when it is at `version`."""
        return self.data if self.data is not None and self.data.version == version else None

    def keep(self, data: TableData) -> None:
        if data is not self.data:
            self.data, self._body = data, None

    def body(self, data: TableData) -> bytes:
        """The encoded list body of `data`: the one kept when `data` is the table kept."""
        if data is not self.data:
            return encode_json(list_body(data))
        if self._body is None:
            self._body = encode_json(list_body(data))
        return self._body


def list_body(data: TableData) -> dict[str, Any]:
    return {"version": data.version, "hosts": data.hosts}
