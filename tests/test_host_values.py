"""A Host field's value that names no host is a 400 (RFC 9112 §3.2, RFC 9110 §7.2),
through a real balancer: an empty label, a port that is not digits or is above
65535, an IP literal not closed or followed by anything but a port
(`balancer.authority.is_valid_host`, read by `balancer.table` on a cache miss).

Bug: ``app.test..`` and ``app.test:abc`` were routed to ``app.test``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
