"""A big store document decoded in slices (`balancer.stores.json_slices`) gives what
the one-call decode gives: the same value, or the same error with the same words
and position, or the same repeated key. Slices are made tiny here so that every
document of the corpus, and thousands of damaged copies, take the sliced path;
the one-call decode (a document no longer than a slice) is the reference.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from balancer.stores import json_slices, strict_json
from balancer.stores.base import TableData
from balancer.stores.file import _Lines

RULES = [
    {"action": "static", "body": "b, \"quoted\",\n  \"x\": 1"},
    {"action": "proxy", "backends": [{"address": "1.2.3.4:80", "weight": 2}],
     "health": {"path": "/h"}, "limits": {"rate": 5}},
    {"action": "empty", "status": 204, "x": [1, 2.5e3, None, True, {}, []]},
]
DAMAGE = ['{', '}', '[', ']', ',', ':', '"', ' ', '\n', '0', 'e', '-', '.', 'N', '\\', 'x',
          'NaN', 'Infinity', '1e999', '9' * 5000, '[' * 3000, '\ufeff', '"\\ud800"', '\x01',
          ', "a.test": {}', '"action": 1, ', ',\n  ']


def table(hosts: int) -> dict[str, Any]:
    return {f"h{n}.test": RULES[n % len(RULES)] for n in range(hosts)}


def layouts(hosts: dict[str, Any]) -> list[str]:
    """The file store's lines, pretty-printed, one line, odd separators."""
    doc = {"version": 3, "hosts": hosts}
    return [_Lines().encode(TableData(3, hosts)).decode(), json.dumps(doc, indent=2),
            json.dumps(doc), json.dumps(doc, indent="\t", separators=(" ,", " : ")),
            json.dumps({**doc, "other": {"a": {"b": 1}, "c": []}}, indent=1)]


def outcome(text: str) -> tuple[Any, ...]:
    try:
        return ("value", repr(strict_json.loads(text)))  # repr: NaN equals itself
    except strict_json.DuplicateKey as exc:
        return ("repeated", exc.path, exc.key, str(exc))
    except RecursionError:
        return ("too deep",)
    except ValueError as exc:  # JSONDecodeError: its message holds its position
        return (type(exc).__name__, str(exc))


def sliced(text: str, chars: int, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    with monkeypatch.context() as patched:
        patched.setattr(json_slices, "SLICE_CHARS", chars)
        return outcome(text)


@pytest.mark.parametrize("text", [
    *layouts(table(9)), *layouts({}),
    '{"version": 3, "hosts": {"a.test": {}, "a.test": {}}}',
    '{"version": 3, "hosts": {"a.test": {"x": 1, "x": 2}, "b.test": {}, "b.test": {}}}',
    '{"version": 3, "version": 4, "hosts": {"a.test": {"x": 1, "x": 2}}}',
    '{"version": 3, "hosts": {"a.test": {"x": 1}}} x', '{"version": 3, "hosts": {"a.test": }}',
    '{"version": 3, "hosts": {"a.test": {}, }}', '{"version": 3, "hosts": {"a.test" {}}}',
    '{"version": 3, "hosts": {"a.test": {}}', '{"version": 3, "hosts": {"a.test": 1}e9}',
    '{"version": 3, "hosts": {"a.test": {}}, "x": NaN, "y": -Infinity}  \n',
    '{"version": 3, "hosts": {"a.test": {"body": "\\ud800", "\\u0061": 1}}}',
    '{"version": 3, "hosts": {"a.test": %s}}' % ("[" * 100_000),
    '{"version": %s, "hosts": {}}' % ("9" * 5000), ' \n{} ', '[1, 2]', '{', '{"a"', '',
])
@pytest.mark.parametrize("chars", [1, 7, 60])
def test_a_document_decodes_in_slices_as_in_one_call(
        text: str, chars: int, monkeypatch: pytest.MonkeyPatch) -> None:
    assert sliced(text, chars, monkeypatch) == outcome(text)


def damaged(text: str, rng: random.Random) -> str:
    """`text` with a character deleted, inserted or replaced, a stretch repeated
    (members twice), or cut short."""
    at = rng.randrange(len(text) + 1)
    how = rng.randrange(5)
    if how == 0:
        return text[:at] + text[at + 1:]
    if how == 1:
        return text[:at] + rng.choice(DAMAGE) + text[at:]
    if how == 2:
        return text[:at] + rng.choice(DAMAGE) + text[at + 1:]
    if how == 3:
        return text[:at] + text[max(0, at - 60):at] + text[at:]
    return text[:at]


def test_damaged_documents_fail_in_slices_as_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A few thousand damaged tables, each decoded both ways."""
    rng = random.Random(20261206)
    texts = layouts(table(8))
    seen = set()
    for _ in range(3000):
        text = rng.choice(texts)
        for _ in range(rng.randint(1, 3)):
            text = damaged(text, rng)
        expected = outcome(text)
        seen.add(expected[0])
        assert sliced(text, rng.choice([1, 7, 60, 300]), monkeypatch) == expected, text
    assert {"value", "repeated", "JSONDecodeError", "ValueError"} <= seen
