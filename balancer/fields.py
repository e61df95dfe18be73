"""Working on a raw header block that llhttp has already validated.

A *field block* is the bytes of a message head between the end of the start
line and the blank line, each field preceded by CRLF:
``b"\\r\\nHost: a\\r\\nX-A: 1"``. Because llhttp rejected bare CR/LF, obs-fold
and whitespace before colons, ``b"\\r\\n" + name + b":"`` in the lower-cased
block finds exactly the fields of that name. Searching a few names in one
block is cheaper than a Python call per field.
"""

from __future__ import annotations

from collections.abc import Iterable


def field_keys(names: Iterable[bytes]) -> tuple[bytes, ...]:
    """Search keys for `without_fields`: ``b"\\r\\n" + name + b":"`` per lower-case name."""
    return tuple(b"\r\n" + name + b":" for name in names)


def without_fields(block: bytes, lower: bytes, keys: Iterable[bytes]) -> bytes:
    """`block` with every field whose `field_keys` key is in `keys` removed."""
    cuts = []
    for key in keys:
        start = lower.find(key)
        while start >= 0:
            end = block.find(b"\r\n", start + 2)
            if end < 0:
                end = len(block)
            cuts.append((start, end))
            start = lower.find(key, end)
    if not cuts:
        return block
    cuts.sort()
    pieces, pos = [], 0
    for start, end in cuts:
        pieces.append(block[pos:start])
        pos = end
    pieces.append(block[pos:])
    return b"".join(pieces)


def field_list(block: bytes) -> list[tuple[bytes, bytes]]:
    """(name, value) pairs of a block, for code off the hot path (logs, tests)."""
    pairs = []
    for line in block.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b":")
            pairs.append((name, value.strip(b" \t")))
    return pairs
