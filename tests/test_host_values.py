"""A Host field's value that names no host is a 400 (RFC 9112 §3.2, RFC 9110 §7.2),
through a real balancer: an empty label, a port that is not digits or is above
65535, an IP literal not closed or followed by anything but a port
(`balancer.authority.is_valid_host`, read by `balancer.table` on a cache miss).

Bug: ``app.test..`` and ``app.test:abc`` were routed to ``app.test``.
"""

from __future__ import annotations

import itertools
import random
import re
import time
from collections.abc import Iterator

import pytest

from balancer.authority import _is_literal, _is_port, is_valid_authority, is_valid_host
from tests.support import Balancer, raw_exchange, split_responses

HOSTS = {"app.test": {"action": "static", "status": 200, "body": "app"}}

INVALID = [b"app.test..", b"app..test", b".app.test", b".", b"app.test:abc",
           b"app.test:99999", b"app.test:65536", b"app.test:-1", b"app.test:80:80",
           b"app.test:+80", b"app.test:80a", b"[::1]x", b"[::1", b"[::1]:99999", b":80", b"[v1.x]y",
           b"app.test:" + b"9" * 5000]
# served as app.test (a trailing dot, any case, a port in range, leading zeros, no
# digits after the colon: RFC 3986 §3.2.3), or unknown (404) but never refused
VALID = [(b"app.test", 200), (b"app.test.", 200), (b"APP.Test:8080", 200),
         (b"app.test:", 200), (b"app.test:0080", 200), (b"app.test:65535", 200),
         (b"[::1]:80", 404), (b"other.test", 404), (b"app_test", 404),
         (b"[v1.x]", 404), (b"[V1.x]:80", 404)]  # (RFC 3986's "v": any case, as with nginx)


@pytest.fixture(scope="module")
def bal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    balancer = Balancer(tmp_path_factory.mktemp("hosts"), HOSTS)
    yield balancer
    balancer.stop()


def exchange(bal: Balancer, *hosts: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """One request per host on one connection, the last closing it."""
    data = b"".join(b"GET / HTTP/1.1\r\nHost: %s\r\n%s\r\n"
                    % (host, b"Connection: close\r\n" if n == len(hosts) - 1 else b"")
                    for n, host in enumerate(hosts))
    return split_responses(raw_exchange(bal.port, data))


@pytest.mark.parametrize("host", INVALID, ids=lambda h: h[:20].decode())
def test_a_host_that_names_no_host_is_a_400_and_closes(bal: Balancer, host: bytes) -> None:
    [(status, headers, _)] = exchange(bal, host, b"app.test")  # the second never read
    assert status == 400 and headers.get("connection") == "close"


@pytest.mark.parametrize(("host", "status"), VALID, ids=lambda v: str(v))
def test_valid_hosts_are_routed(bal: Balancer, host: bytes, status: int) -> None:
    [(got, _, body)] = exchange(bal, host)
    assert got == status
    if status == 200:
        assert body == b"app"


def test_a_cached_host_and_an_invalid_one_on_one_connection(bal: Balancer) -> None:
    """The invalid value is refused after a valid one was cached (and again when it is
    cached itself: the route remembered is the 400)."""
    for _ in range(2):
        [(first, _, body), (second, _, _)] = exchange(bal, b"app.test", b"app.test:abc",
                                                      b"app.test")
        assert (first, body, second) == (200, b"app", 400)


def test_an_absolute_form_target_with_a_port_out_of_range_is_a_400(bal: Balancer) -> None:
    raw = raw_exchange(bal.port, b"GET http://app.test:99999/ HTTP/1.1\r\nHost: app.test\r\n"
                                 b"Connection: close\r\n\r\n")
    assert split_responses(raw)[0][0] == 400


# `is_valid_host`'s grammar for a name, as the regular expression it was until
# 2026-12-07 (it took 10-30 ms for a 60 KB Host): the searches replacing it must
# give the same verdicts
REFERENCE_NAME = re.compile(rb"(?:[^.:\[\]]+\.)*[^.:\[\]]+\.?(?::([0-9]*))?")
REFERENCE_PIECES = [b"[", b"]", b":", b"::1", b"[::1]", b"[::ffff:1.2.3.4]", b"1.2.3.4", b"a",
                    b".", b"..", b":80", b":65536", b":00080", b"v1.x", b"[v1.a:b]", b"%25",
                    b"\xd9\xa5", b"-", b"*", b" ", b"x" * 60]


def test_the_host_check_judges_as_the_regular_expression_it_replaced() -> None:
    """Every value of up to 5 bytes over the bytes that matter, and random joins of
    pieces: `is_valid_host` and the reference agree (an IPvFuture past
    `MAX_LITERAL` aside: none here; an IP literal is `LITERAL`'s in both)."""
    def reference(host: bytes) -> bool:
        return not host or _reference_judges(host, REFERENCE_NAME)
    wrong = [h for h in _generated(b"a.:[]0v-", REFERENCE_PIECES)
             if is_valid_host(h) != reference(h)]
    assert wrong == []


def _reference_judges(value: bytes, name: re.Pattern[bytes]) -> bool:
    """A value judged as with the regular expression `name` (then a literal)."""
    named = name.fullmatch(value)
    return _is_port(named.group(1)) if named is not None else _is_literal(value)


def _generated(alphabet: bytes, pieces: list[bytes]) -> Iterator[bytes]:
    """Every value of up to 5 bytes of `alphabet`, then 20,000 random joins of
    1 to 6 `pieces`."""
    rnd = random.Random(7)
    yield from (bytes(t) for n in range(6) for t in itertools.product(alphabet, repeat=n))
    for _ in range(20000):
        yield b"".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 6)))


# `is_valid_authority`'s grammar for a name, as the regular expression it was until
# 2026-12-07 (1.5 ms for an 8 KB authority, backtracking)
REFERENCE_AUTHORITY = re.compile(rb"(?:[A-Za-z0-9-]+\.)*[A-Za-z0-9-]+\.?(?::([0-9]*))?")


def test_the_authority_check_judges_as_the_regular_expression_it_replaced() -> None:
    """The same values, and bytes a name may not have (``_``, ``%``, ``*``, NUL,
    a non-ASCII digit), judged by `is_valid_authority` and the reference alike."""
    pieces = [*REFERENCE_PIECES, b"_", b"%", b"\0", b"\xb2", b"A-Z", b"app.test"]
    wrong = [h for h in _generated(b"a.:[0-_", pieces)
             if is_valid_authority(h) != _reference_judges(h, REFERENCE_AUTHORITY)]
    assert wrong == []


def test_a_long_authority_is_judged_in_linear_time() -> None:
    """8 KB judged in well under half a millisecond (the regular expression: 1.5-5 ms)."""
    values = [b"a" * 8000 + b"!", b"a." * 4000 + b"*", b"a" * 8000 + b":" + b"1" * 99 + b"x"]
    for value in values:
        started = time.process_time()  # (CPU: no other process's share)
        for _ in range(100):
            assert not is_valid_authority(value)
        assert time.process_time() - started < 0.05, value[:20]
