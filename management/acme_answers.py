"""What an ACME CA answers, made safe for the issuer (`management.acme_ca`): each
answer's size capped (`cap_answer`), its ``Retry-After`` read (`retry_after`),
and every failure told as one line for the operator (`*_reason`, `problem_text`).

Invariants:
* An answer (as decoded) never grows past `MAX_ANSWER` bytes in memory.
* A reason is one line of at most ~300 characters of the CA's text, control
  characters shown as "?": a hostile CA cannot forge log lines or paint a
  terminal through it.
"""

from __future__ import annotations

import datetime
import math
import ssl
from email.utils import parsedate_to_datetime
from typing import Any

import requests
from acme import errors, messages

from management.acme_guard import IssueError

MAX_ANSWER = 1 << 20  # bytes of one answer of the CA at most (a chain is a few KB)


def cap_answer(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
    """A requests response hook: the body (as decoded) may not pass `MAX_ANSWER`
    bytes; a CA that floods (or a compression bomb) ends the issuance instead of
    the management process's memory."""
    response.raw = CappedBody(response.raw, MAX_ANSWER, f"{response.request.method} "
                              f"{response.url}" if response.request is not None else "a request")
    return response


class CappedBody:
    """A response's raw body (urllib3's) that refuses to grow past `limit` bytes."""

    def __init__(self, raw: Any, limit: int, what: str) -> None:
        self.raw = raw
        self.limit = limit
        self.what = what

    def stream(self, amt: int = 65536, decode_content: bool | None = None) -> Any:
        total = 0
        for chunk in self.raw.stream(amt, decode_content=decode_content):
            total += len(chunk)
            if total > self.limit:
                self.raw.close()
                raise IssueError(f"the CA's answer to {self.what} is larger than "
                                 f"{self.limit // 1024} KiB")
            yield chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def retry_after(value: str, now: float) -> int | None:
    """The whole seconds a ``Retry-After`` field asks to wait (RFC 9110 §10.2.3:
    delay-seconds or an HTTP date, rounded up; negative for a date past), or None
    when it is neither."""
    value = value.strip()
    if value.isdigit():
        return int(value[:12])  # (more digits than a CA means: clamped by the caller)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return math.ceil(when.timestamp() - now)


def validation_reason(exc: errors.ValidationError) -> str:
    """What the CA said of each failed challenge, on one line."""
    parts = []
    for authzr in exc.failed_authzrs:
        name = authzr.body.identifier.value
        for challb in authzr.body.challenges:
            if challb.error is not None:
                parts.append(f"{name}: {problem_text(challb.error)}")
    return "validation failed: " + ("; ".join(parts) or "the CA gave no reason")


def client_reason(exc: errors.ClientError) -> str:
    """What the ACME client could not make sense of, on one line: an HTTP error
    without an ACME problem document, or an answer that is not JSON."""
    found = exc.args[0] if exc.args else None
    if isinstance(found, tuple) and found:
        found = found[0]  # (response, why its problem document is unreadable)
    if isinstance(found, requests.Response):
        kind = (found.headers.get("Content-Type") or "no Content-Type").split(";")[0]
        method = found.request.method if found.request is not None else "request"
        return (f"the CA answered HTTP {found.status_code} ({kind}, not an ACME problem "
                f"document) to {method} {found.url}")
    text = first_line(exc)
    prefix = "Unexpected response Content-Type: "
    if text.startswith(prefix):
        return f"the CA's answer is not JSON (Content-Type: {text[len(prefix):] or 'none'})"
    return f"ACME error: {text}"


def tls_reason(exc: BaseException) -> str:
    """OpenSSL's reason inside what requests raised (urllib3's retry error holds
    an SSLError holding it), else the first line of its text."""
    found: object = exc
    for _ in range(8):
        if isinstance(found, ssl.SSLCertVerificationError):
            return first_line(found.verify_message or found)
        if not isinstance(found, BaseException):
            break
        inner = getattr(found, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((a for a in found.args if isinstance(a, BaseException)), None)
        found = inner if inner is not None else found.__cause__
    return first_line(exc)


def problem_text(problem: messages.Error) -> str:
    """An ACME problem document as one line: ``type: detail``."""
    code = problem.code or (problem.typ or "error").rsplit(":", 1)[-1]
    detail = problem.detail or problem.title or ""
    return first_line(f"{code}: {detail}" if detail else code)


def first_line(exc: object) -> str:
    """The first line of what the CA (or a library) said, at most 300 characters,
    control characters (a terminal escape in a hostile CA's detail) shown as "?"."""
    text = str(exc).strip() or type(exc).__name__
    line = "".join(c if c.isprintable() else "?" for c in text.splitlines()[0])
    return line[:300] + ("…" if len(line) > 300 else "")
