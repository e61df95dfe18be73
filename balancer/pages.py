"""Built-in HTML pages: routing outcomes and protocol errors.

Invariants:

* every page is read once, by ``Pages.load`` at start; nothing here touches
  the disk per request;
* a ``Pages`` value always holds every name in ``PAGE_STATUS``: an override in
  ``pages_dir/NAME.html`` replaces the built-in body, a missing one keeps it;
* page bodies are valid UTF-8 and non-empty, so ``content_type`` is honest;
* an override file that cannot be used is an error naming the file, at load:
  not a regular file, empty, not UTF-8, or larger than ``MAX_PAGE_BYTES``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parent / "pages"

HTML = b"text/html; charset=utf-8"
# The largest page body: each worker holds every page, and sends one whole from
# memory (bug: any size was read, a multi-GB file held by every worker or the
# start-up killed by memory)
MAX_PAGE_BYTES = 1 << 20

PAGE_STATUS: dict[str, int] = {
    "unknown": 404,                # no rule for the host (SPEC §3)
    "no-hosts": 503,               # the routing table is empty
    "timeout": 504,                # backend or spin timeout
    "bad-gateway": 502,            # no backend could answer
    "maintenance": 503,            # for `static` rules: {"page": "maintenance"}
    "busy": 503,                   # spin cap reached; a rule's limits answer it with 429
    "bad-request": 400,            # malformed or smuggling-prone request
    "uri-too-long": 414,           # request line over limits.max_request_line
    "headers-too-large": 431,      # head over limits.max_header_bytes / max_headers
    "payload-too-large": 413,      # body over a rule's max_body_bytes
    "request-timeout": 408,        # head not received within timeouts.client_header
    "not-implemented": 501,        # unsupported method or transfer coding
    "version-not-supported": 505,  # not HTTP/1.0 or HTTP/1.1
    "expectation-failed": 417,     # an Expect other than 100-continue
    "misdirected-request": 421,    # Host not covered by the TLS connection's certificate
}


class PageError(Exception):
    """A page file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class Page:
    """A ready-to-send page: status code, body bytes and Content-Type value."""

    name: str
    status: int
    body: bytes
    content_type: bytes


class Pages:
    """Every built-in page, with overrides applied; immutable after ``load``."""

    __slots__ = ("_pages",)

    def __init__(self, pages: Mapping[str, Page]) -> None:
        missing = [name for name in PAGE_STATUS if name not in pages]
        if missing:
            raise PageError("pages missing: " + ", ".join(missing))
        self._pages = dict(pages)

    @classmethod
    def load(cls, pages_dir: str = "") -> Pages:
        """Read the built-in pages, then overrides from ``pages_dir/NAME.html`` if given."""
        bodies = {name: _read_builtin(name) for name in PAGE_STATUS}
        if pages_dir:
            bodies.update(_read_overrides(pages_dir))
        return cls({name: Page(name, PAGE_STATUS[name], body, HTML)
                    for name, body in bodies.items()})

    @staticmethod
    def names() -> tuple[str, ...]:
        """All page names, in ``PAGE_STATUS`` order."""
        return tuple(PAGE_STATUS)

    def get(self, name: str) -> Page:
        """The page called ``name``; ``KeyError`` for a name not in ``PAGE_STATUS``."""
        try:
            return self._pages[name]
        except KeyError:
            raise KeyError(f"unknown page {name!r}; pages are {', '.join(PAGE_STATUS)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._pages

    def __repr__(self) -> str:
        return f"<Pages {len(self._pages)} pages>"


def _read_builtin(name: str) -> bytes:
    # A plain path, not importlib.resources: that imports importlib.readers lazily,
    # which fails after a privilege drop when Python itself lives under /root.
    resource = BUILTIN_DIR / f"{name}.html"
    try:
        body = resource.read_bytes()
    except OSError as exc:
        raise PageError(f"built-in page {resource}: cannot read: {exc}") from None
    return _checked(str(resource), body)


def _read_overrides(pages_dir: str) -> dict[str, bytes]:
    try:
        entries = sorted(os.listdir(pages_dir))
    except OSError as exc:
        raise PageError(f"pages_dir {pages_dir}: cannot list: {exc.strerror or exc}") from None
    overrides = {}
    for entry in entries:
        name, ext = os.path.splitext(entry)
        if ext != ".html":
            continue
        path = os.path.join(pages_dir, entry)
        if name not in PAGE_STATUS:
            # A typo (unkown.html) would otherwise be silently ignored.
            raise PageError(f"page override {path}: not a page name; pages are "
                            + ", ".join(PAGE_STATUS))
        overrides[name] = _read_override(path)
    return overrides


def _read_override(path: str) -> bytes:
    """The bytes of a regular file. Opened without blocking: a FIFO (or a device,
    a socket) is refused at once (bug: the open of a FIFO waited for a writer, the
    start-up check was killed after 30 s naming no cause, and a reload too)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise PageError(f"page override {path}: cannot read: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PageError(f"page override {path}: cannot read: not a regular file")
        with open(fd, "rb", closefd=False) as file:
            body = file.read(MAX_PAGE_BYTES + 1)  # (a file still growing: the bytes read)
        if len(body) > MAX_PAGE_BYTES:
            raise PageError(f"page override {path}: larger than {MAX_PAGE_BYTES} bytes "
                            f"(1 MiB, the most a page may be)")
    except OSError as exc:
        raise PageError(f"page override {path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return _checked(path, body)


def _checked(path: str, body: bytes) -> bytes:
    if not body.strip():
        raise PageError(f"page {path}: is empty")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PageError(f"page {path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") \
            from None
    return body
