"""Request ids (`balancer.connection.RequestIds`): a per-process random prefix and
a counter, ``prefix + "%08x" % count``, built from a table and a part formatted
once per 256 ids; the same bytes as formatting each id whole, past 8 digits too."""

from __future__ import annotations

import re

import pytest

from balancer.connection import RequestIds

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)


def test_ids_are_the_prefix_and_the_count_in_hex() -> None:
    ids = RequestIds()
    assert re.fullmatch(rb"[0-9a-f]{12}", ids.prefix)
    for count in range(1, 1030):  # four times past a multiple of 256
        assert ids.next() == b"%s%08x" % (ids.prefix, count)


@pytest.mark.parametrize("start", [(1 << 24) - 1, (1 << 32) - 1, (1 << 40) - 1])
def test_ids_past_eight_digits(start: int) -> None:
    """Where the count needs more digits (a multiple of 256 minus one: the next id
    formats its high part anew)."""
    ids = RequestIds()
    ids.count = start
    for count in range(start + 1, start + 600):
        assert ids.next() == b"%s%08x" % (ids.prefix, count)


def test_two_processes_worth_of_ids_differ() -> None:
    first, second = RequestIds(), RequestIds()
    assert first.prefix != second.prefix and first.next() != second.next()
