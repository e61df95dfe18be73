"""Client-IP and forwarding fields (issue 15.5): a client on an external
listener cannot forge any field a backend framework would trust, in either
spelling ("-" or "_"); the balancer sets X-Real-IP itself. On an internal
(trusted) listener they are kept, X-Forwarded-For is extended.

A scripted client sends them; a raw backend records exactly what it got.
"""

from __future__ import annotations

import socket

import pytest

from balancer.fields import CLIENT_FIELDS
from tests.rawpeer import RawBackend, client_exchange, head_fields
from tests.support import Balancer, wait_for

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

SPOOF = "6.6.6.6"
# What the issue saw forwarded, and what Werkzeug ProxyFix, Django, Rails/Rack,
# Express, Symfony, ASP.NET and the client-IP libraries read.
FORGED = [
    "X-Real-IP", "X-Forwarded-Port", "X-Forwarded-Prefix", "X-Forwarded-Ssl",
    "X-Forwarded-Server", "X-Client-IP", "True-Client-IP", "X-Forwarded-Scheme",
    "X-Original-Forwarded-For", "X-Cluster-Client-IP", "Client-IP", "Fastly-Client-IP",
    "CF-Connecting-IP", "X-ProxyUser-Ip", "Forwarded", "X-Forwarded-For",
    "X-Forwarded-Proto", "X-Forwarded-Host", "X-Forwarded-Protocol", "Front-End-Https",
    "X-Url-Scheme", "X-Forwarded-By", "X-Original-Host", "X-Original-For",
    "X-Original-URL", "X-Rewrite-URL", "X-Appengine-Remote-Addr",
    # CGI-style servers read these as the hyphenated names
    "X_Forwarded_For", "X_Real_IP", "x-forwarded_host", "Client_IP", "X_Request_Id",
]
OURS = {"x-forwarded-for", "x-real-ip", "x-forwarded-proto", "x-forwarded-host",
        "x-request-id"}


def answer_ok(conn: socket.socket, request: bytes) -> bool:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    return True


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One balancer (with an internal listener) before one raw backend, for the module."""
    backend = RawBackend(answer_ok)
    bal = Balancer(tmp_path_factory.mktemp("forwarded"),
                   {"app.test": {"action": "proxy", "backends": [backend.address]}},
                   internal=True)
    yield bal, backend
    bal.stop()
    backend.stop()


@pytest.fixture
def setup(shared):
    """``bal, backend``: the module's, the backend's record of requests emptied."""
    shared[1].requests.clear()
    return shared


def forged_request() -> bytes:
    fields = "".join(f"{name}: {SPOOF}\r\n" for name in FORGED)
    return f"GET / HTTP/1.1\r\nHost: app.test\r\n{fields}Connection: close\r\n\r\n".encode()


def received(backend: RawBackend, count: int) -> list[tuple[str, str]]:
    wait_for(lambda: len(backend.requests) >= count, what="the backend to get the request")
    return head_fields(backend.requests[count - 1])


def test_the_list_covers_every_forged_name() -> None:
    for name in FORGED:
        assert name.lower().encode() in CLIENT_FIELDS or name.lower() == "x_request_id", name


def test_external_listener_drops_every_forged_field_and_sets_its_own(setup) -> None:
    bal, backend = setup
    answer = client_exchange(bal.port, forged_request())
    assert answer.startswith(b"HTTP/1.1 200")
    fields = received(backend, 1)
    assert not [f for f in fields if SPOOF in f[1]], fields
    names = [name for name, _ in fields]
    assert not set(names) & {n.lower() for n in FORGED} - OURS
    mine = {name: value for name, value in fields if name in OURS}
    assert mine["x-forwarded-for"] == mine["x-real-ip"] == "127.0.0.1"
    assert mine["x-forwarded-proto"] == "http" and mine["x-forwarded-host"] == "app.test"
    for name in OURS:
        assert names.count(name) == 1, name


def test_internal_listener_keeps_them_and_extends_x_forwarded_for(setup) -> None:
    bal, backend = setup
    answer = client_exchange(bal.ports["internal"], forged_request())
    assert answer.startswith(b"HTTP/1.1 200")
    fields = received(backend, 1)
    kept = {name for name, value in fields if value == SPOOF}
    assert kept == {n.lower() for n in FORGED} - {"x-forwarded-for", "x-request-id"}
    values = dict(fields)
    assert values["x-forwarded-for"] == f"{SPOOF}, 127.0.0.1"
    assert values["x-real-ip"] == SPOOF  # the front proxy's word for the client
    assert [name for name, _ in fields].count("x-real-ip") == 1


def test_internal_listener_adds_what_is_missing(setup) -> None:
    bal, backend = setup
    client_exchange(bal.ports["internal"],
                    b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
    values = dict(received(backend, 1))
    assert values["x-forwarded-for"] == values["x-real-ip"] == "127.0.0.1"
    assert values["x-forwarded-proto"] == "http" and values["x-forwarded-host"] == "app.test"


@pytest.mark.parametrize("listener", ["proxy", "internal"])
def test_fields_named_in_connection_are_not_forwarded(setup, listener) -> None:
    """Connection's options name hop-by-hop fields of this hop (RFC 9110 §7.6.1),
    looked up beside the listener's dropped fields."""
    bal, backend = setup
    port = bal.port if listener == "proxy" else bal.ports["internal"]
    client_exchange(port, b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Secret: 1\r\nX-Kept: 2\r\n"
                          b"X-Other: 3\r\nConnection: close, X-Secret,x-other\r\n\r\n")
    names = [name for name, _ in received(backend, 1)]
    assert "x-kept" in names
    assert "x-secret" not in names and "x-other" not in names, names


@pytest.mark.parametrize(("connection", "kept"), [("close", False), ("keep-alive", True)])
def test_a_close_field_goes_when_connection_close_names_it(setup, connection: str,
                                                           kept: bool) -> None:
    """`Close` is a marked name (the forwarded head is cut at its marks): a field
    of that name, in any case, goes with `Connection: close` and stays otherwise."""
    bal, backend = setup
    client_exchange(bal.port, b"GET / HTTP/1.1\r\nHost: app.test\r\nClose: 1\r\nX-Kept: 2\r\n"
                              b"CLOSE: 3\r\nConnection: %s\r\n\r\n" % connection.encode(),
                    until=b"\r\n\r\n")
    names = [name for name, _ in received(backend, 1)]
    assert "x-kept" in names
    assert names.count("close") == (2 if kept else 0), names
