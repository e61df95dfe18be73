"""HTTP plumbing of the management API: JSON bodies, errors, conditions, auth, files.

Invariants:
* Every error leaves through `ApiError` and becomes exactly one response
  shape, ``{"error": CODE, "message": TEXT, "details": [...]}``, in
  `error_response` (`error_bytes`: the same for a head refused before the app
  runs, `management.server`).
* A request body is read at most `MAX_BODY` bytes (+1 to detect excess); a
  larger body is answered 413 before any of it is parsed.
* Routes match the request target's path as sent (`route_path`: the server's
  raw target, ``REQUEST_URI`` or ``RAW_URI``), its percent-encoding kept; each
  matched segment is decoded alone afterwards (`path_arguments`). Bug: the path
  was decoded before routing, so ``DELETE /api/v1/hosts/a.test%2Fbackends%2FADDR``
  removed a backend: an encoded ``/`` (or ``?``, ``#``) never changes the route.
* A body is strict JSON: NaN, Infinity, numbers too large for a float and
  integers longer than `MAX_INT_DIGITS` digits are 400 `invalid_json`, and so
  is nesting deeper than `MAX_DEPTH`, checked
  before parsing (a body of 100,000 ``[`` never reaches the parser's recursion),
  and a name twice in one object (the last would win silently).
"""

from __future__ import annotations

import hmac
import json
import math
import mimetypes
import re
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from werkzeug.routing import Rule
from werkzeug.security import safe_join
from werkzeug.wrappers import Request, Response

MAX_BODY = 1024 * 1024
MAX_DEPTH = 32  # arrays and objects inside each other; a rule needs 4
MAX_INT_DIGITS = 100  # digits of an integer in a body (a weight, a timeout needs a few)
# a string, or an unterminated one to the end (never fails at a quote: linear time)
_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\Z)', re.DOTALL)
_NOT_BRACKETS = re.compile(rb"[^\[\]{}]+")
_IF_MATCH = re.compile(r'^\s*(?:W/)?"?(\d{1,18})"?\s*$')
# on every JSON answer: never cached, never taken for a page
JSON_HEADERS = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"))


class ApiError(Exception):
    """An error answer: HTTP status, machine code, human message, details."""

    def __init__(self, status: int, code: str, message: str,
                 details: list[Any] | None = None, headers: dict[str, str] | None = None
                 ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.headers = headers or {}


def bad_request(problems: list[str], what: str = "the query") -> ApiError:
    """400 `bad_request`: `details` lists every problem, `message` says how many
    (the shape of `invalid_rule`)."""
    n = len(problems)
    return ApiError(400, "bad_request", f"{what} is invalid ({n} problem{'s' if n != 1 else ''})",
                    problems)


def check_query(request: Request) -> None:
    """`bad_request` for a query string with raw bytes that are not UTF-8
    (werkzeug decodes it strictly: each route's `request.args` would raise)."""
    try:
        request.query_string.decode()
    except UnicodeDecodeError:
        raise bad_request(["the query string is not UTF-8 (percent-encode its bytes)"]) from None


ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")  # scheme://authority


class Route(Rule):
    """A werkzeug `Rule` whose URL builders are compiled at their first use.

    werkzeug generates and compiles two builder functions per rule as the rule
    is added to its `Map` (Python source through `ast` and `compile`): about a
    fifth of the management process's start-up CPU for the API's rules
    (docs/performance.md), spent at every start. The API matches routes and
    builds no URL, so they are made only if one is built, as werkzeug makes them."""

    def _compile_builder(self, append_unknown: bool = True) -> Any:
        made: list[Any] = []

        def build(rule: Rule, *args: Any, **values: Any) -> Any:
            if not made:
                made.append(Rule._compile_builder(rule, append_unknown))
            return made[0](rule, *args, **values)
        return build


def route_path(environ: dict[str, Any]) -> str:
    """The path routes match: the request target's as the client sent it, percent
    escapes kept (``REQUEST_URI`` or ``RAW_URI``: werkzeug, gunicorn, uWSGI and
    `management.server` give one). A server that gives neither leaves only the
    decoded ``PATH_INFO``, encoded again: there an encoded ``/`` cannot be told
    from a ``/``. Leading slashes are one, as werkzeug's `match` routes them, so
    the token check sees the path that is routed (bug: ``//healthz`` routed to
    the public ``/healthz`` but was refused 401 without the token)."""
    target = environ.get("REQUEST_URI") or environ.get("RAW_URI")
    if not target:
        path = quote(environ.get("PATH_INFO", "").encode("latin-1"), safe="/:@!$&'()*+,;=[]~")
    else:  # an absolute-form target's (RFC 9112 §3.2.2) past its authority, whatever
        # that holds (bug: `urlsplit` raised on an unclosed "[": a 500 and a traceback)
        start = ABSOLUTE_FORM.match(target)
        path = target[start.end() if start else 0:].partition("?")[0]
    return "/" + path.lstrip("/")


def path_arguments(args: dict[str, Any]) -> dict[str, Any]:
    """The segments a route matched (`route_path`, still percent-encoded), each
    decoded alone, as UTF-8 (a byte that is not: U+FFFD, as werkzeug decodes a
    path; no host or address has one, so its route answers 400 or 404)."""
    return {name: unquote_to_bytes(value.encode("latin-1", "replace")).decode("utf-8",
                                                                              "replace")
            for name, value in args.items()}


def encode_json(body: Any) -> bytes:
    """A JSON answer's body: compact, strict (no NaN), ending with a newline."""
    return (json.dumps(body, indent=None, separators=(",", ":"), allow_nan=False)
            + "\n").encode()


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> Response:
    """`body` as compact JSON and a newline (`bytes`: that JSON already encoded,
    e.g. by `encode_json`)."""
    data = body if isinstance(body, bytes) else encode_json(body)
    response = Response(data, status=status, mimetype="application/json")
    for name, value in (*JSON_HEADERS, *(headers or {}).items()):
        response.headers[name] = value
    return response


def error_response(exc: ApiError) -> Response:
    return json_response(_error_body(exc), exc.status, exc.headers)


def error_bytes(exc: ApiError) -> bytes:
    """`error_response` as a whole HTTP/1.1 response that closes the connection,
    in bytes: the answer to a request head refused before there is a request to
    give the app (too large, too slow, malformed)."""
    body = encode_json(_error_body(exc))
    head = [f"HTTP/1.1 {exc.status} {HTTPStatus(exc.status).phrase}",
            "Content-Type: application/json",
            *(f"{name}: {value}" for name, value in (*JSON_HEADERS, *exc.headers.items())),
            "Connection: close", f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(head).encode("latin-1") + body


def _error_body(exc: ApiError) -> dict[str, Any]:
    return {"error": exc.code, "message": exc.message, "details": exc.details}


def version_headers(version: int) -> dict[str, str]:
    """The ETag a client echoes in ``If-Match`` to make a conditional write."""
    return {"ETag": f'"{version}"'}


def read_json(request: Request) -> Any:
    """The JSON body, or `ApiError` 413 `payload_too_large` / 400 `invalid_json`
    (not JSON, not UTF-8, NaN or Infinity, nested deeper than `MAX_DEPTH`, a
    name twice in one object)."""
    length = request.content_length
    if length is not None and length > MAX_BODY:
        raise _too_large()
    raw = request.stream.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise _too_large()
    if not raw.strip():
        raise ApiError(400, "invalid_json", "the request body is empty; expected JSON")
    check_depth(raw)
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant,
                          parse_float=_finite_float, parse_int=_bounded_int,
                          object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the body is not UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:  # a number refused below
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None


def check_depth(raw: bytes) -> None:
    """`ApiError` 400 `invalid_json` if arrays and objects nest deeper than `MAX_DEPTH`.

    Strings are cut out first (a bracket inside one does not count); what is
    left of a bracket run is scanned once, without recursion."""
    brackets = _NOT_BRACKETS.sub(b"", _STRINGS.sub(b"", raw))
    if brackets.count(b"[") + brackets.count(b"{") <= MAX_DEPTH:
        return
    depth = 0
    for byte in brackets:
        depth += 1 if byte in b"[{" else -1
        if depth > MAX_DEPTH:
            raise ApiError(400, "invalid_json",
                           f"the body nests arrays and objects deeper than {MAX_DEPTH} levels")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose names are unique (RFC 8259 §4), else `ApiError` 400
    `invalid_json`: a parser that kept the first of two values would read
    another rule or table than the one written (json keeps the last)."""
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            raise ApiError(400, "invalid_json",
                           f"the body has the name {name!r} twice in one object; "
                           "names must be unique")
        seen.add(name)
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number in JSON; numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large for a number; numbers must be finite")
    return value


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:  # (Python refuses 4,300+ digits with advice to raise a limit)
        raise ValueError(f"an integer of {digits} digits is too large; numbers must be "
                         f"at most {MAX_INT_DIGITS} digits long")
    return int(text)


def _too_large() -> ApiError:
    return ApiError(413, "payload_too_large",
                    f"the request body is larger than {MAX_BODY} bytes")


def if_match(request: Request) -> int | None:
    """The version an ``If-Match: "N"`` header requires, None when absent or ``*``."""
    value = request.headers.get("If-Match")
    if value is None or value.strip() == "*":
        return None
    match = _IF_MATCH.match(value)
    if match is None:
        raise ApiError(400, "invalid_header",
                       f'If-Match: expected a table version such as "12", got {value!r}')
    return int(match.group(1))


def check_token(request: Request, token: str | None) -> None:
    """`ApiError` 401 unless the request carries ``Authorization: Bearer TOKEN``."""
    if not token:
        return
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                          token.encode()):
        return
    reason = "a bearer token is required" if not given else "the bearer token is wrong"
    raise ApiError(401, "unauthorized", reason,
                   headers={"WWW-Authenticate": 'Bearer realm="balancer"'})


def file_response(directory: Path, name: str) -> Response:
    """A file under `directory` with its content type, or `ApiError` 404."""
    path = safe_join(str(directory), name)
    if path is None or not Path(path).is_file():
        raise ApiError(404, "not_found", f"no static file {name!r}")
    content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    if content_type.startswith("text/") or content_type in ("application/javascript",
                                                            "application/json"):
        content_type += "; charset=utf-8"
    response = Response(Path(path).read_bytes(), content_type=content_type)
    response.headers["Cache-Control"] = "no-cache"
    return response
