"""Decoding the JSON a store holds, refusing an object that names a key twice.

Python's `json` keeps the last of repeated keys without a word, so a routes
file edited by hand with a host listed twice (or a rule with two
``"backends"``) served one of them and said nothing. A store decodes what it
reads with `loads`, which raises `DuplicateKey` (a ValueError: callers that
treat undecodable text as a corrupt store keep doing so) naming the key and
where it is.

Invariants:
* A document without repeated keys decodes exactly as `json.loads` does; the
  check costs one call per object decoded (about a third of `json.loads`'s
  time), and finding where the key is costs a second decode, only for a
  document that has one.
* Keys are compared as decoded: ``"a"`` and ``"\\u0061"`` are the same key.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from balancer.stores import json_slices
from balancer.turns import turn

LOCATE_EVERY = 2000  # items looked at between two turns of the loop, finding a repeated key
Path = tuple[str | int, ...]


class DuplicateKey(ValueError):
    """An object in the document names `key` twice; `path` leads to that object
    (object keys and list indexes from the top)."""

    def __init__(self, path: Path, key: str) -> None:
        super().__init__(f'the key {json.dumps(key)} appears twice{where_in(path)}')
        self.path = path
        self.key = key


class _Repeated(ValueError):
    """Raised by `_unique` inside the decoder: some object repeats a key."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Repeated
    return obj


class _Marked(dict):  # type: ignore[type-arg]
    """An object that repeated `repeated` (the first such key), when locating it."""

    repeated = ""


def _marking(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    marked = _Marked(obj)
    marked.repeated = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
    return marked


_DECODER = json.JSONDecoder(object_pairs_hook=_unique)
_LOCATOR = json.JSONDecoder(object_pairs_hook=_marking)


def loads(text: str | bytes) -> Any:
    """`json.loads(text)`, raising `DuplicateKey` for an object that repeats a key
    (and what `json.loads` raises: ValueError, RecursionError)."""
    if isinstance(text, bytes):
        text = text.decode(json.detect_encoding(text), "surrogatepass")
    try:
        return json_slices.decode(text, _DECODER, _Repeated)
    except _Repeated:
        pass
    found = _locate(json_slices.decode(text, _LOCATOR, None), ())
    assert found is not None  # the first decode met one
    raise DuplicateKey(*found)


def _locate(value: Any, path: Path) -> tuple[Path, str] | None:
    """The first (outermost, then in document order) object repeating a key."""
    if isinstance(value, _Marked):
        return path, value.repeated
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for n, (name, inner) in enumerate(items):
        if n % LOCATE_EVERY == LOCATE_EVERY - 1:
            turn()  # a big object (the file's hosts)
        found = _locate(inner, (*path, name))
        if found is not None:
            return found
    return None


def where_in(path: Path) -> str:
    """`` (in "health")``, `` (in "backends"[1])``; "" at the top."""
    if not path:
        return ""
    shown = "".join(f"[{p}]" if isinstance(p, int) else
                    (json.dumps(p) if n == 0 else f".{json.dumps(p)}")
                    for n, p in enumerate(path))
    return f" (in {shown})"
