"""What idle connections hold between their requests: a pooled backend
connection no response head and no llhttp parser (`ResponseParser.idle`,
`ResponseCallbacks.spare`; the backend's last head is one for all its
connections, `Backend.heads`), a parked keep-alive client connection no llhttp
parser (`balancer.http11.Spares`). Through real sockets: an in-process worker
in front of the scripted backend of tests/test_inline.py, several clients at
once so that it opens several backend connections."""

from __future__ import annotations

import pytest

from tests import test_inline
from tests.test_inline import ScriptedBackend, connect, get, response, until

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)
backend = test_inline.backend  # the fixtures: a scripted backend, a worker in front of it
make = test_inline.make

CLIENTS = 4


def test_idle_connections_hold_no_head_nor_llhttp_parser(make: test_inline.Make,
                                                            backend: ScriptedBackend) -> None:
    w = make()
    socks = [connect(w) for _ in range(CLIENTS)]
    backend.release.clear()
    for sock in socks:  # held at once by the backend: one connection each
        sock.sendall(get("/hold"))
    assert until(lambda: len(backend.requests) == CLIENTS)
    backend.release.set()
    for sock in socks:
        assert response(sock)[0] == 200
    pool = w.registry.backends[backend.address]
    assert until(lambda: len(pool.pooled()) == CLIENTS) and backend.connections == CLIENTS
    callbacks = w.contexts[0].response_callbacks
    for upstream in pool.pooled():
        parser = upstream.parser
        assert parser is not None and parser._head is None and parser._hp is None
    assert pool.heads.last is not None and 1 <= len(callbacks.spare) <= CLIENTS
    for round in range(3):  # each connection reused, the answers whole
        for n, sock in enumerate(socks):
            sock.sendall(get(f"/r{round}-{n}"))
        for n, sock in enumerate(socks):
            status, _, body = response(sock)
            assert status == 200 and body.endswith(b" /r%d-%d" % (round, n))
    assert backend.connections == CLIENTS
    assert all(u.parser is not None and u.parser._head is None for u in pool.pooled())
    conns = w.io.connections
    assert until(lambda: len(conns) == CLIENTS and all(c.task is None for c in conns))
    assert all(c.parser._hp is None for c in conns)  # parked: llhttp's parser given back
    assert 1 <= len(w.contexts[0].request_callbacks.spare) <= CLIENTS
    for sock in socks:
        sock.close()
