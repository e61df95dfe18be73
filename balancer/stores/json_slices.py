"""Decoding a big JSON document in slices, the loop going round between them.

`json` decodes a document in one C call: a routes file of 100,000 hosts
(6 MB) took 0.2 s on an idle core and up to 1.3 s on a loaded one, and a
worker (or the management process) answered nothing meanwhile. `decode`
gives what ``decoder.decode(text)`` gives, decoding the top-level object a
member at a time and each object in it (the file's ``"hosts"``) a slice of
about `SLICE_CHARS` at a time, with a turn of the loop (`balancer.turns.turn`)
between slices.

Invariants:
* `decode` returns what ``decoder.decode(text)`` returns and raises what it
  raises: the same exception, message and position (a bad separator is
  decoded again by `json` from just before it, to get its words), found in
  the same order. A document of `SLICE_CHARS` or less, or one that is not an
  object, is decoded in one call.
* A slice is the text of many members, from a member's key up to a cut where
  the separator between the object's first two members appears again (one
  member per line, as the file store writes), decoded as one object: it
  decodes only if the cut falls between two members of that object (inside
  a string or a nested value it cannot: strings hold no raw newline and
  brackets would not balance). From a slice that does not decode on, or in
  an object whose members are not one per line, members are decoded one at
  a time: the exact error, or the same value at 1.5x the CPU (and more
  memory: the rules' keys are no longer shared).
* Slices are merged only when the decoder's hook is ``dict(pairs)`` that
  raises `unique` for a repeated key (`strict_json`): the merged object then
  raises `unique` when its members outnumber its keys. Otherwise every pair
  goes to the hook, as `json` gives them.
* Positions are the document's; a value is decoded one or two levels less
  deep than in one call, so the recursion limit is met that much deeper
  (of ~1,000).
"""

from __future__ import annotations

import json
import re
from typing import Any

from balancer.turns import turn

SLICE_CHARS = 1 << 16  # characters decoded between two turns of the loop: ~2 ms idle
_WS = r"[ \t\n\r]*"  # json's whitespace
_FIRST = re.compile(_WS + r'(["}])')  # after "{": a key or the end
_COLON = re.compile(_WS + ":" + _WS)
_NEXT = re.compile(_WS + "," + _WS + '"')  # after a value: the next key
_CLOSE = re.compile(_WS + r"\}")
_SPACE = re.compile(_WS)
_AFTER_VALUE = '{"":""'  # before a separator, for `_Slices.error`: a value nothing extends


def decode(text: str, decoder: json.JSONDecoder, unique: type[ValueError] | None) -> Any:
    """``decoder.decode(text)``, turning the loop between slices of a big object.
    `unique`: what the decoder's hook (``dict(pairs)`` otherwise) raises for a
    repeated key, so that slices decoded apart may be merged; None, the hook
    gets every pair."""
    start = _skip_space(text, 0)
    if len(text) <= SLICE_CHARS or not text.startswith("{", start):
        return decoder.decode(text)
    value, end = _Slices(text, decoder, unique).object(start + 1, 0)
    end = _skip_space(text, end)
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def _skip_space(text: str, at: int) -> int:
    space = _SPACE.match(text, at)
    assert space is not None  # it matches the empty string
    return space.end()


class _Members:
    """One object's members as decoded: every pair for the hook, or (merging)
    the object so far and how many members made it."""

    def __init__(self, hook: Any, unique: type[ValueError] | None) -> None:
        self.hook = hook
        self.unique = unique
        self.pairs: list[tuple[str, Any]] = []
        self.merged: dict[str, Any] = {}
        self.count = 0

    def add(self, key: str, value: Any) -> None:
        if self.unique is None:
            self.pairs.append((key, value))
        else:
            self.merged[key] = value
            self.count += 1

    def merge(self, part: dict[str, Any]) -> None:
        """A slice's members (its keys unique: the hook raised otherwise)."""
        self.merged.update(part)
        self.count += len(part)

    def value(self) -> Any:
        if self.unique is None:
            return self.hook(self.pairs)
        if self.count != len(self.merged):
            raise self.unique
        return self.merged


class _Slices:
    """One document's decode: its top-level object (depth 0) a member at a time,
    each object member of it (depth 1) a slice at a time when it can be."""

    def __init__(self, text: str, decoder: json.JSONDecoder, unique: type[ValueError] | None
                 ) -> None:
        self.text = text
        self.decoder = decoder
        self.scan = decoder.scan_once  # type: ignore[attr-defined]
        self.unique = unique
        self.turned = 0  # where the loop last went round
        self.next_cut = 0  # no slice is tried before here (none found up to it)

    def object(self, start: int, depth: int) -> tuple[Any, int]:
        """The object whose ``{`` is just before `start`, and where it ends."""
        text = self.text
        first = _FIRST.match(text, start)
        if first is None:
            raise self.error(start, "{")
        if first.group(1) == "}":
            return self.decoder.object_pairs_hook([]), first.end()  # type: ignore[misc]
        members = _Members(self.decoder.object_pairs_hook, self.unique)
        end = self.member(first.end() - 1, depth, members, start, "{")
        separator = ""  # between the first two members: where slices are cut
        while True:
            after = _NEXT.match(text, end)
            if after is None:
                close = _CLOSE.match(text, end)
                if close is None:
                    raise self.error(end, _AFTER_VALUE)
                return members.value(), close.end()
            key = after.end() - 1
            separator = separator or after.group()
            self.pause(key)
            if depth == 1 and self.unique is not None and "\n" in separator:
                cut = self.slice(key, separator, members)
                if cut is not None:
                    end = cut
                    continue
            end = self.member(key, depth, members, end, _AFTER_VALUE)

    def member(self, key: int, depth: int, members: _Members, anchor: int, prefix: str) -> int:
        """Decode the member whose key's quote is at `key` into `members`; where its
        value ends. `anchor`, `prefix`: where a bad separator is decoded again from."""
        text = self.text
        name, end = json.decoder.scanstring(text, key + 1, self.decoder.strict)  # type: ignore[attr-defined]
        colon = _COLON.match(text, end)
        if colon is None:
            raise self.error(anchor, prefix)
        at = colon.end()
        if depth == 0 and text.startswith("{", at):
            value, end = self.object(at + 1, 1)
        else:
            try:
                value, end = self.scan(text, at)
            except StopIteration as err:
                raise json.JSONDecodeError("Expecting value", text, err.value) from None
        members.add(name, value)
        return end

    def slice(self, key: int, separator: str, members: _Members) -> int | None:
        """Decode the members from `key` to a cut past `SLICE_CHARS` into `members`;
        where the last one's value ends, or None (decode them one at a time)."""
        if key < self.next_cut:
            return None
        text = self.text
        window = key + SLICE_CHARS
        cut = text.find(separator, window, window + SLICE_CHARS)
        if cut < 0:  # a big member, or the object's last slice: a member at a time
            self.next_cut = window + SLICE_CHARS
            return None
        piece = "{" + text[key:cut] + "}"
        try:
            part, end = self.scan(piece, 0)
        except (ValueError, RecursionError, StopIteration):  # the exact error (or the
            part, end = None, -1  # repeated key: `unique` is one) is found a member at a time
        if end != len(piece):  # members not one per line: decoded a member at a time
            self.next_cut = len(text)
            return None
        members.merge(part)
        return cut

    def pause(self, at: int) -> None:
        if at - self.turned >= SLICE_CHARS:
            turn()
            self.turned = at

    def error(self, anchor: int, prefix: str) -> json.JSONDecodeError:
        """The error `json` raises for the separator after `anchor` (a ``{``, or a
        value's end): that text decoded again after `prefix`, which stands for what
        came before, so it stops at the same place with the same words."""
        try:
            self.decoder.raw_decode(prefix + self.text[anchor:])
        except json.JSONDecodeError as exc:
            return json.JSONDecodeError(exc.msg, self.text, exc.pos - len(prefix) + anchor)
        raise AssertionError(f"no JSON error after {anchor}")  # the separator was found bad
