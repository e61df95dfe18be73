"""Conditional reads of the table (RFC 9110 §13.1.2 ``If-None-Match``); the table
and its encoded answer come from `management.table_reads`. A host's write honours
``If-None-Match: *`` (create only: `create_only`).

Invariants:
* The table's entity tag is ``"N"``, its version (`management.http.version_headers`);
  within one store a version names one table (versions only grow), so a client
  holding version N holds the table. ``If-None-Match`` uses the weak comparison:
  ``W/"N"`` and ``"N"`` both match version N; ``*`` matches any table; a tag is
  compared as text (``"012"`` is not version 12, a tag of another server never
  matches).
* ``If-None-Match`` on a write (any method but ``GET`` and ``HEAD``: checked
  for every route by `management.app`) is never ignored (bug: ``PUT`` of a
  host with ``If-None-Match: *``, a client's "create it only if absent", wrote
  over the host there; review-control: ``PUT`` of a certificate still did):
  ``*`` on ``PUT /api/v1/hosts/HOST`` writes only a host absent (412
  `host_exists`); any other (tags, another write) is 400 `invalid_header`
  rather than a write made against the client's condition.
* A malformed header is 400 `invalid_header`. A header is read in time linear
  in its length (bounded by the listener's ``limits.max_header_bytes``),
  however many tags or empty members it lists.
"""

from __future__ import annotations

import re

from werkzeug.wrappers import Request, Response

from management.http import ApiError

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


def create_only(request: Request, creates: bool = False) -> bool:
    """Whether a write of the table asks to be made only if its host is absent
    (``If-None-Match: *``, honoured where the write `creates` a host); `ApiError`
    400 for an ``If-None-Match`` the write cannot honour. False without the header."""
    value = request.headers.get("If-None-Match")
    if value is None:
        return False
    if creates and value.strip(" \t") == "*":
        return True
    raise ApiError(400, "invalid_header",
                   "If-None-Match on a write: only `*` on PUT /api/v1/hosts/HOST (write "
                   "the host only if it does not exist) is honoured; use If-Match: \"N\" "
                   f"to write only at version N (got {_shown(value)!r})")


def _shown(value: str) -> str:
    return value if len(value) <= SHOWN else f"{value[:SHOWN]}... ({len(value)} characters)"


def _tags(value: str) -> set[str]:
    tags: set[str] = set()
    at = 0
    while at < len(value):
        member = _MEMBER.match(value, at)
        if member is None or member.end() == at:
            raise ApiError(400, "invalid_header",
                           f'If-None-Match: expected "*" or entity tags such as "12" or '
                           f'W/"12" separated by commas, got {_shown(value)!r}')
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
