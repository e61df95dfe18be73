"""Domain fronting (docs/tls.md): a TLS connection made for one name (SNI)
whose requests name another host (`Host`). Served by `Host` by default, as
nginx; with `tls.refuse_domain_fronting`, answered 421 Misdirected Request
unless the Host's certificate is the one the connection got (as Traefik).
Real balancer, real backends, real TLS clients."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from balancer.stores.file import FileStore
from tests.support import Backend, Balancer, wait_for
from tests.test_tls import client_context, put_cert


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, Backend]]:
    made = {name: Backend(name) for name in ("a", "b", "w")}
    yield made
    for backend in made.values():
        backend.stop()


def start(tmp: Path, backends: dict[str, Backend], refuse: bool, more: str = "",
          catch_all: bool = False) -> Balancer:
    hosts = {"a.test": "a", "b.test": "b", "*.wild.test": "w", "plain.test": "b"}
    if catch_all:
        hosts["*"] = "b"
    routes = tmp / "routes.json"
    routes.write_text(json.dumps({"version": 1, "hosts": {
        host: {"action": "proxy", "backends": [backends[name].address]}
        for host, name in hosts.items()}}))
    for host in ("a.test", "b.test", "*.wild.test"):
        put_cert(routes, host)
    config = f"[tls]\nrefuse_domain_fronting = {'true' if refuse else 'false'}\n{more}"
    return Balancer(tmp, args=["--tls-listen", "127.0.0.1:0"], config=config)


def exchange(bal: Balancer, sni: str, hosts: list[str], tmp: Path) -> list[tuple[int, bytes]]:
    """(status, body) of one GET per Host in `hosts`, in turn on one keep-alive
    TLS connection made for `sni`, until the balancer closes it."""
    context = client_context(tmp)
    context.check_hostname = False  # (an unknown name gets the default certificate)
    answers: list[tuple[int, bytes]] = []
    with socket.create_connection(("127.0.0.1", bal.ports["tls"]), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=sni) as tls:
        for host in hosts:
            tls.sendall(f"GET /x HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            response = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
            try:
                response.begin()
            except (http.client.RemoteDisconnected, ConnectionError):
                return answers  # closed after the answer before
            answers.append((response.status, response.read()))
    return answers


def backend_of(body: bytes) -> str:
    return str(json.loads(body)["backend"])


def test_off_by_default_a_request_is_served_by_its_host(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    bal = start(tmp_path, backends, refuse=False)
    try:
        answers = exchange(bal, "a.test", ["b.test", "plain.test", "a.test"], tmp_path)
        assert [(status, backend_of(body)) for status, body in answers] == [
            (200, "b"), (200, "b"), (200, "a")]
    finally:
        bal.stop()


def test_on_a_host_of_another_certificate_gets_421_and_the_connection_closes(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    bal = start(tmp_path, backends, refuse=True)
    try:
        served = backends["b"].count
        # the first request is served in a greenlet, the next ones in the hub
        answers = exchange(bal, "a.test", ["a.test", "A.TEST.:443", "b.test", "a.test"],
                           tmp_path)
        assert [status for status, _ in answers] == [200, 200, 421]
        assert b"421" in answers[2][1] and b"Misdirected Request" in answers[2][1]
        assert backends["b"].count == served  # never sent on
        assert [s for s, _ in exchange(bal, "a.test", ["plain.test"], tmp_path)] == [421]
        assert [s for s, _ in exchange(bal, "a.test", ["127.0.0.1"], tmp_path)] == [421]
        # names of one wildcard certificate share its connections
        assert [s for s, _ in exchange(bal, "x.wild.test", ["y.wild.test", "x.wild.test"],
                                       tmp_path)] == [200, 200]
        assert [s for s, _ in exchange(bal, "x.wild.test", ["a.test"], tmp_path)] == [421]
        assert [s for s, _ in exchange(bal, "b.test", ["b.test"], tmp_path)] == [200]
    finally:
        bal.stop()


def test_on_the_default_certificate_serves_its_own_host_only(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    """A name with no certificate got `tls.default_host`'s: only that host's
    requests go on such a connection."""
    bal = start(tmp_path, backends, refuse=True, more='default_host = "a.test"\n')
    try:
        assert [s for s, _ in exchange(bal, "unknown.test", ["a.test", "b.test"],
                                       tmp_path)] == [200, 421]
    finally:
        bal.stop()


def test_on_a_request_without_host_gets_421(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    """An HTTP/1.0 request without a Host goes to the catch-all rule `*`, whose
    certificate is not the connection's. Bug: it was served (the check took a
    missing Host for the last one found to match), where ``Host: other.test``,
    routed to the same rule, got a 421."""
    bal = start(tmp_path, backends, refuse=True, catch_all=True)
    try:
        context = client_context(tmp_path)
        context.check_hostname = False
        served = backends["b"].count
        with socket.create_connection(("127.0.0.1", bal.ports["tls"]), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="a.test") as tls:
            tls.sendall(b"GET /x HTTP/1.0\r\n\r\n")
            response = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
            response.begin()
            assert response.status == 421
        assert backends["b"].count == served
        assert [s for s, _ in exchange(bal, "a.test", ["other.test"], tmp_path)] == [421]
    finally:
        bal.stop()


def request_on(tls: ssl.SSLSocket, host: str) -> int:
    """The status of one GET for `host` on the open TLS connection `tls`."""
    tls.sendall(f"GET /x HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    response = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
    response.begin()
    response.read()
    return response.status


def certificate_of(bal: Balancer, sni: str, tmp: Path) -> bytes:
    """The certificate (DER) a new TLS connection made for `sni` gets."""
    context = client_context(tmp)
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", bal.ports["tls"]), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=sni) as tls:
        return tls.getpeercert(binary_form=True) or b""


def handshakes(bal: Balancer, sni: str, tmp: Path) -> bool:
    try:
        certificate_of(bal, sni, tmp)
    except ssl.SSLError:
        return False
    return True


def test_a_host_is_judged_again_when_the_certificates_change(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    """Keep-alive connections open while certificates change (one worker):
    `y.wild.test`, served on a connection made for `x.wild.test` (one wildcard
    certificate), gets a 421 there once it has a certificate of its own, as a
    request made after the change would on a new connection; a connection whose
    own certificate is replaced meanwhile goes on serving its host, and gets a
    421 for it once that certificate is deleted. Bug: a Host once found to
    match stayed so for the connection's life."""
    bal = start(tmp_path, backends, refuse=True)
    routes = tmp_path / "routes.json"
    context = client_context(tmp_path)
    context.check_hostname = False
    try:
        with socket.create_connection(("127.0.0.1", bal.ports["tls"]), timeout=10) as raw_w, \
                context.wrap_socket(raw_w, server_hostname="x.wild.test") as wild, \
                socket.create_connection(("127.0.0.1", bal.ports["tls"]), timeout=10) as raw_a, \
                context.wrap_socket(raw_a, server_hostname="a.test") as own:
            assert [request_on(wild, "y.wild.test"), request_on(own, "a.test")] == [200, 200]
            before = {name: certificate_of(bal, name, tmp_path)
                      for name in ("y.wild.test", "a.test")}
            put_cert(routes, "y.wild.test")
            put_cert(routes, "a.test")  # replaced: open connections keep the old one
            wait_for(lambda: all(certificate_of(bal, name, tmp_path) != der
                                 for name, der in before.items()),
                     what="the new certificates to be served")
            assert request_on(own, "a.test") == 200
            assert request_on(wild, "y.wild.test") == 421
            FileStore(str(routes)).certs().delete("a.test")
            wait_for(lambda: not handshakes(bal, "a.test", tmp_path),
                     what="the deleted certificate to go")
            assert request_on(own, "a.test") == 421  # its Host gets no certificate now
        assert [s for s, _ in exchange(bal, "x.wild.test", ["z.wild.test", "y.wild.test"],
                                       tmp_path)] == [200, 421]
        assert [s for s, _ in exchange(bal, "y.wild.test", ["y.wild.test"], tmp_path)] == [200]
    finally:
        bal.stop()


def test_one_keep_alive_connection_follows_many_changes(
        tmp_path: Path, backends: dict[str, Backend]) -> None:
    """One keep-alive connection made for `x.wild.test` asks for `y.wild.test`
    while the certificates change many times (other hosts' stored and deleted,
    the wildcard's own replaced): 200 after each (judged again under each), then
    421 at its first request once `y.wild.test` has a certificate of its own (a
    421 ends the connection). Polls with requests on that connection."""
    bal = start(tmp_path, backends, refuse=True)
    routes = tmp_path / "routes.json"
    context = client_context(tmp_path)
    context.check_hostname = False
    try:
        with socket.create_connection(("127.0.0.1", bal.ports["tls"]), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="x.wild.test") as wild:
            assert request_on(wild, "y.wild.test") == 200
            for change in range(6):  # the wildcard's replaced, a new host's stored
                host, sni = [("*.wild.test", "z.wild.test"),
                             (f"n{change}.test", f"n{change}.test")][change % 2]
                before = certificate_of(bal, sni, tmp_path) if change % 2 == 0 else b""
                put_cert(routes, host)
                wait_for(lambda sni=sni, before=before: handshakes(bal, sni, tmp_path)
                         and certificate_of(bal, sni, tmp_path) != before,
                         what=f"change {change} served")
                assert request_on(wild, "y.wild.test") == 200
            put_cert(routes, "y.wild.test")
            wait_for(lambda: handshakes(bal, "y.wild.test", tmp_path) and certificate_of(
                bal, "y.wild.test", tmp_path) != certificate_of(bal, "z.wild.test", tmp_path),
                what="y.wild.test's own certificate served")
            assert request_on(wild, "y.wild.test") == 421
    finally:
        bal.stop()
