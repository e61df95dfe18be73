"""The page every backend and WSGI server in the suite serves.

Invariant: `PAGE` is the same bytes everywhere (nginx serves it from a file the
suite writes, the built-in backend and both WSGI servers import it), so a target
that answers with anything else is answering wrongly.
"""

from __future__ import annotations

PAGE_SIZE = 4500

_LOREM = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua ut enim ad minim veniam quis nostrud "
    "exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat duis aute irure "
    "dolor in reprehenderit in voluptate velit esse cillum dolore eu fugiat nulla pariatur "
    "excepteur sint occaecat cupidatat non proident sunt in culpa qui officia deserunt "
    "mollit anim id est laborum"
)



def build_page(size: int = PAGE_SIZE) -> bytes:
    """A deterministic lorem-ipsum HTML page of exactly `size` bytes."""
    head = b"<!doctype html>\n<html><head><title>Lorem ipsum</title></head><body>\n"
    tail = b"</body></html>\n"
    words = _LOREM.split()
    body = bytearray()
    index = 0
    while len(head) + len(body) + len(tail) < size:
        sentence = " ".join(words[(index + k) % len(words)] for k in range(12))
        body += b"<p>" + sentence.capitalize().encode() + b".</p>\n"
        index += 7
    page = head + bytes(body)[: size - len(head) - len(tail)] + tail
    assert len(page) == size
    return page


PAGE: bytes = build_page()
