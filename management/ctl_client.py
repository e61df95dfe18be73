"""`balancerctl`'s client of the management API: a call's request, its answer
checked and decoded, every failure turned into `CtlError`.

Invariants:
* Whatever the server at ``--url`` answers, a call returns a JSON object or
  raises `CtlError`; nothing else escapes (`management.ctl_http` bounds the
  exchange: no redirect followed, `MAX_ANSWER` bytes, ``--timeout`` seconds).
* An answer is JSON as RFC 8259 has it: UTF-8, no NaN or Infinity, numbers of
  at most `MAX_DIGITS` digits and finite, nested at most `MAX_DEPTH` deep (the
  API's answers are 6 deep; a deeper one would exhaust the recursion of the
  decoder or of ``--json``'s printing).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from balancer.settings_kinds import token_problem
from balancer.stores.atomic import MAX_FILE_BYTES
from management.ctl_http import Answer, Unanswered, Unreachable, exchange

DEFAULT_URL = "http://127.0.0.1:8081"
TIMEOUT = 60.0  # seconds a call may take in all, by default (--timeout)
# the management API's body limit (`management.http.MAX_BODY`, not imported: werkzeug);
# a larger body is answered 413 before it is read, and the client sees a broken pipe
MAX_BODY = 1024 * 1024
# bytes of an answer read at most: the largest store file, as `GET /api/v1/hosts` (the
# largest answer of the API) is about the size of the routes file it comes from, so
# every table the file store serves can be listed (bug: 128 MiB refused those over it)
MAX_ANSWER = MAX_FILE_BYTES
MAX_DEPTH = 64
MAX_DIGITS = 40  # of an integer: the API's are 64-bit (20 digits)


class CtlError(Exception):
    """A failure to report as ``balancerctl: <message>``."""


class UsageError(CtlError):
    """A command line that cannot be a request: reported as argparse does, exit 2."""


class Client:
    """JSON over HTTP to the management API, errors turned into `CtlError`."""

    def __init__(self, url: str, token: str | None, timeout: float = TIMEOUT) -> None:
        self.url = checked_url(url)
        found = token_problem(token) if token else None
        if found is not None:
            raise UsageError("--token (or BALANCER_TOKEN): a bearer token is visible ASCII "
                             f"(spaces only inside); the token given has {found}")
        self.token = token
        self.timeout = timeout
        self.received = 0  # bytes of answers read so far

    def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """The API's JSON object answering `method` `path` (`body` sent as JSON)."""
        answer = self._exchange(method, path, self._encoded(body))
        self.received += len(answer.body)
        status = f"{answer.status} {answer.reason}"
        if 300 <= answer.status < 400:  # bug: urlopen followed these, the token along
            location = answer.headers.get("Location")
            to = f" to {location}" if location else ""
            raise CtlError(f"{self.url} answered {status}{to}; balancerctl does not follow "
                           f"redirects: give the management API's own address with --url "
                           f"or BALANCER_URL")
        if not is_json(answer):
            raise CtlError(self._not_the_api(status, answer))
        if answer.status >= 400:
            raise CtlError(api_error(answer))
        try:
            value = decode(answer.body)
        except ValueError as exc:
            raise CtlError(f"{self.url} answered {method} {path} with {exc}") from None
        if answer.status < 200 or not isinstance(value, dict):
            raise CtlError(f"{self.url} answered {method} {path} with {status} and "
                           f"{_kind(value)}, not the management API's JSON object")
        return value

    def _encoded(self, body: Any) -> bytes | None:
        try:
            data = None if body is None else json.dumps(body, allow_nan=False).encode()
        except ValueError as exc:
            raise CtlError(f"cannot send {body!r}: {exc}") from None
        if data is not None and len(data) > MAX_BODY:
            raise CtlError(f"the request is {len(data)} bytes; the management API takes "
                           f"{MAX_BODY} at most")
        return data

    def _exchange(self, method: str, path: str, data: bytes | None) -> Answer:
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            return exchange(self.url, method, path, data, headers, self.timeout, MAX_ANSWER)
        except Unreachable as exc:
            raise CtlError(f"cannot reach {self.url}: {exc} (is `balancer serve` running? "
                           f"--url or BALANCER_URL names its [management] listen address, "
                           f"default {DEFAULT_URL})") from None
        except Unanswered as exc:
            raise CtlError(f"{self.url}: {exc}") from None

    def _not_the_api(self, status: str, answer: Answer) -> str:
        """The hint for an answer that is not the management API's JSON."""
        headers = answer.headers
        kind = headers.get_content_type() if headers.get("Content-Type") else "no content type"
        return (f"{self.url} answered {status} with {kind}, not the management API's JSON: "
                f"this looks like the proxy (or another server), not the management API; "
                f"use --url or BALANCER_URL with the balancer's [management] listen address "
                f"(default {DEFAULT_URL})")


def checked_url(url: str) -> str:
    """`url` without a trailing slash, or `UsageError` unless it is http(s)://HOST[:PORT]
    (bug: ``http://[::1:8081`` or a port of 99999 ended in a traceback or a misleading
    "Connection refused")."""
    expected = "expected http://HOST:PORT or https://HOST:PORT"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError when out of range
    except ValueError as exc:
        raise UsageError(f"--url {url!r}: {exc}; {expected}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--url {url!r}: {expected}")
    if parts.query or parts.fragment or not url.isprintable() or " " in url:
        raise UsageError(f"--url {url!r}: a query, a fragment, spaces or control "
                         f"characters cannot be part of the API's address; {expected}")
    return url.rstrip("/")


def is_json(answer: Answer) -> bool:
    return answer.headers.get_content_type() == "application/json"


HINTS = {  # what to do about an API error that is the client's set-up, not the request
    "unauthorized": " (give the balancer's [management] token with --token or BALANCER_TOKEN)",
}


def api_error(answer: Answer) -> str:
    """``404 not_found: no rule for host 'x'`` plus details, on one line."""
    try:
        body = decode(answer.body)
        text = f"{answer.status} {body['error']}: {body['message']}"
        if body.get("details"):
            text += " (" + "; ".join(str(d) for d in body["details"]) + ")"
        return text + HINTS.get(body["error"], "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{answer.status} {answer.reason}"


def decode(body: bytes) -> Any:
    """The JSON value of an answer's body, or `ValueError` saying what it is instead."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"a body that is not UTF-8 (byte {exc.start} is {body[exc.start]:#x}); "
                         f"the management API answers JSON") from None
    try:
        value = json.loads(text or "null", parse_constant=refuse_constant,
                           parse_float=finite_float, parse_int=bounded_int)
    except RecursionError:  # (deeper than the decoder's recursion: about 1,000)
        raise ValueError(TOO_DEEP) from None
    except ValueError as exc:
        raise ValueError(f"a body that is not JSON ({exc})") from None
    if not is_shallow(value):
        raise ValueError(TOO_DEEP)
    return value


TOO_DEEP = f"JSON nested deeper than {MAX_DEPTH} levels (the management API's answers are 6 deep)"


def is_shallow(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether `value`'s lists and objects nest at most `limit` deep (walked level
    by level, no recursion)."""
    level = [value]
    for _ in range(limit):
        level = [child for node in level if isinstance(node, dict | list)
                 for child in (node.values() if isinstance(node, dict) else node)
                 if isinstance(child, dict | list)]
        if not level:
            return True
    return False


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is not a finite number")
    return value


def bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise ValueError(f"a number of {len(text)} digits")
    return int(text)
