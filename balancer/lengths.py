"""A head's repeated Content-Length merged into one (sans-IO).

RFC 9112 §6.3 (5) and RFC 9110 §8.6: a Content-Length that is a list, or
repeated, whose values are all valid and the same, is processed with that
single value; HAProxy 2.6 merges them so (nginx 1.22 refuses). llhttp refuses
them ("Duplicate Content-Length", "Invalid character in Content-Length"), so
`balancer.http11` gives such a head, once whole, to `merged_lengths` and
parses the head it returns again: everything else in it is llhttp's to judge.

Invariants:
* Only valid Content-Length fields are touched: a name spelt exactly (any case)
  before the colon, a value that is a list of digits with blanks around them.
  The first becomes ``Content-Length: <decimal>``, the others go: one field is
  forwarded, written plainly (as `http11._plain_length`).
* Any empty element (``5,,5``, ``5,``), other byte or different number is no
  merge (None): the head is refused as llhttp refused it.
"""

from __future__ import annotations

from typing import Final

# llhttp's reasons for a head `merged_lengths` may take
MERGEABLE: Final = frozenset(("Duplicate Content-Length",
                              "Invalid character in Content-Length"))
LENGTH_DIGITS: Final = 4300  # the most digits `int` reads (sys.get_int_max_str_digits)
BLANKS: Final = b" \t"


def merged_lengths(head: bytes) -> bytes | None:
    """`head` (request line to its blank line, CRLF CRLF included) with its
    Content-Length fields merged into one, or None when they are not all the
    same valid number (module doc)."""
    lines = head.split(b"\r\n")
    length: int | None = None
    first = 0
    kept: list[bytes] = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not kept or not colon or name.lower() != b"content-length":
            kept.append(line)  # (the request line is never a field)
            continue
        for element in value.split(b","):
            digits = element.strip(BLANKS)
            if not digits.isdigit() or len(digits) > LENGTH_DIGITS:
                return None
            number = int(digits)
            if length is not None and number != length:
                return None
            length = number
        if not first:
            first = len(kept)
            kept.append(b"")
    if length is None:
        return None
    kept[first] = b"Content-Length: %d" % length
    return b"\r\n".join(kept)
