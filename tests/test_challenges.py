"""ACME challenge answers in the data plane (balancer/challenges.py): HTTP-01 on
the listeners, TLS-ALPN-01 in the handshake, hostile requests and ClientHellos.
The challenges are written to the store the way the issuer writes them; the
whole issuance against a real CA is tests/test_acme.py."""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from balancer.challenges import NEED_MORE, Challenges, parse_hello
from balancer.stores.file import FileStore
from management.acme_ca import ACME_IDENTIFIER, alpn_certificate
from tests.support import Backend, Balancer, raw_exchange, request, wait_for
from tests.test_tls import _handshakes, client_context, put_cert

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
ANSWER = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
pytestmark = pytest.mark.data_plane


def http01(token: str = TOKEN, answer: str = ANSWER, life: float = 600) -> dict:
    return {"type": "http-01", "host": "app.test", "token": token,
            "key_authorization": answer, "expires": time.time() + life}


def alpn01(host: str, answer: str = ANSWER) -> dict:
    chain, key = alpn_certificate(host, answer)
    return {"type": "tls-alpn-01", "host": host, "chain": chain, "key": key,
            "expires": time.time() + 600}


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    b = Backend("acme")
    yield b
    b.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Iterator[Balancer]:
    tmp = tmp_path_factory.mktemp("challenges")
    hosts = {"app.test": {"action": "proxy", "backends": [backend.address], "tls": "acme"},
             "secure.test": {"action": "proxy", "backends": [backend.address],
                             "https_redirect": True, "tls": "acme"}}
    bal = Balancer(tmp, hosts, args=["--tls-listen", "127.0.0.1:0"],
                   config="[timeouts]\nclient_header = 1.0\n"
                   '[acme]\ndirectory = "http://127.0.0.1:9/dir"\n')  # never a real CA
    put_cert(bal.routes, "alpn.test")
    acme = FileStore(str(bal.routes)).acme()
    acme.put_challenge(f"http-01:{TOKEN}", http01())
    acme.put_challenge("http-01:old", http01("old", "old.x", life=-1))  # expired
    acme.put_challenge("tls-alpn-01:alpn.test", alpn01("alpn.test"))
    wait_for(lambda: request(bal.port, path=f"/.well-known/acme-challenge/{TOKEN}")[2]
             == ANSWER.encode(), what="the challenge to be served (followed within a second)")
    # written straight into the store: the workers' own look (once a second) serves it
    wait_for(lambda: _handshakes(bal.ports["tls"], "alpn.test", client_context(tmp)),
             what="alpn.test's certificate to be served")
    # the workers may have read the challenges before the tls-alpn-01 one was written
    wait_for(lambda: _answers_alpn01(bal.ports["tls"], "alpn.test"),
             what="alpn.test's tls-alpn-01 challenge to be answered")
    yield bal
    bal.stop()


def test_http01_tokens_are_answered_before_the_rule_on_every_listener(site: Balancer) -> None:
    path = f"/.well-known/acme-challenge/{TOKEN}"
    for host in ("app.test", "APP.test.", f"app.test:{site.port}"):  # as the CA may write it
        status, headers, body = request(site.port, path=path, host=host)
        assert (status, body) == (200, ANSWER.encode()), host
        assert headers["content-type"] == "application/octet-stream"
    status, headers, body = request(site.port, "HEAD", path=path)
    assert status == 200 and body == b"" and headers["content-length"] == str(len(ANSWER))
    # an https_redirect rule, or no rule at all, answers its own challenges first
    acme = FileStore(str(site.routes)).acme()
    for host in ("secure.test", "no-rule.test"):
        acme.put_challenge(f"http-01:tok-{host[:2]}", {**http01(f"tok-{host[:2]}"), "host": host})
    for host in ("secure.test", "no-rule.test"):
        wait_for(lambda h=host: request(site.port, path=f"/.well-known/acme-challenge/tok-"
                                        f"{h[:2]}", host=h)[2] == ANSWER.encode(),
                 what=f"{host}'s challenge answered")


def test_a_token_asked_for_under_another_name_goes_to_the_rule(site: Balancer) -> None:
    """A token is answered only for the name the CA validates (Traefik and Caddy
    do the same): a scanner probing other names, IPs or no Host gets the rule's
    answer, never the key authorization."""
    path = f"/.well-known/acme-challenge/{TOKEN}"
    for host in ("secure.test", "no-such-host.test", "127.0.0.1", "app.test.evil.example",
                 "app.testx", "xapp.test", "app.test:80@evil"):
        status, _, body = request(site.port, path=path, host=host)
        assert ANSWER.encode() not in body, host
        assert status in (200, 308, 400, 404) and (status != 200 or b'"path"' in body), host
    data = raw_exchange(site.port, f"GET {path} HTTP/1.0\r\n\r\n".encode())  # no Host
    assert ANSWER.encode() not in data and data.startswith(b"HTTP/1.1 404 ")
    # many such probes cost nothing and leave the real answer in place
    with socket.create_connection(("127.0.0.1", site.port), timeout=10) as sock:
        sock.sendall(b"".join(f"GET {path} HTTP/1.1\r\nHost: n{i}.test\r\n\r\n".encode()
                              for i in range(200)))
        got = b""
        while got.count(b"HTTP/1.1 404 ") < 200:  # no rule for these names
            chunk = sock.recv(65536)
            assert chunk, got[-200:]
            got += chunk
    assert ANSWER.encode() not in got
    assert request(site.port, path=path)[2] == ANSWER.encode()


def test_other_acme_paths_go_to_the_rule(site: Balancer) -> None:
    prefix = "/.well-known/acme-challenge/"
    for path in (prefix + "unknown", prefix + "old", prefix + TOKEN + "?x=1",
                 prefix + "../../etc/passwd", prefix + "%00" + TOKEN, prefix,
                 prefix + "A" * 7000):
        status, _, body = request(site.port, path=path)
        assert status == 200 and b'"path"' in body, path  # the backend answered
    status, _, body = request(site.port, "POST", path=prefix + TOKEN, body=b"x")
    assert status == 200 and b'"method": "POST"' in body
    # and https_redirect leaves every challenge path alone
    status, headers, _ = request(site.port, path=prefix + "unknown", host="secure.test")
    assert status == 200
    assert request(site.port, path="/", host="secure.test")[0] == 308


def test_a_huge_token_is_refused_like_any_long_request_line(site: Balancer) -> None:
    path = "/.well-known/acme-challenge/" + "A" * 9000
    data = raw_exchange(site.port, f"GET {path} HTTP/1.1\r\nHost: app.test\r\n\r\n".encode())
    assert data.startswith(b"HTTP/1.1 414 ")
    assert request(site.port, path=f"/.well-known/acme-challenge/{TOKEN}")[0] == 200


def test_keep_alive_goes_on_after_a_challenge_answer(site: Balancer) -> None:
    path = f"/.well-known/acme-challenge/{TOKEN}"
    data = raw_exchange(site.port, (f"GET {path} HTTP/1.1\r\nHost: app.test\r\n\r\n"
                                    "GET /next HTTP/1.1\r\nHost: app.test\r\n"
                                    "Connection: close\r\n\r\n").encode())
    assert data.count(b"HTTP/1.1 200 ") == 2
    assert ANSWER.encode() in data and b'"/next"' in data


def alpn_connect(port: int, name: str, protocols: list[str]) -> ssl.SSLSocket:
    context = ssl._create_unverified_context()
    context.set_alpn_protocols(protocols)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(sock, server_hostname=name)


def _answers_alpn01(port: int, name: str) -> bool:
    with alpn_connect(port, name, ["acme-tls/1"]) as tls:
        return tls.selected_alpn_protocol() == "acme-tls/1"


def test_tls_alpn01_answers_only_clients_offering_acme_tls(site: Balancer, tmp_path: Path) -> None:
    port = site.ports["tls"]
    with alpn_connect(port, "alpn.test", ["acme-tls/1"]) as tls:
        assert tls.selected_alpn_protocol() == "acme-tls/1"
        cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        extension = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER)
        assert extension.critical
        tls.settimeout(5)
        assert tls.recv(100) == b""  # closed after the handshake
    # a browser asking for the same name meanwhile gets the real certificate
    context = client_context(tmp_path)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    with context.wrap_socket(sock, server_hostname="alpn.test") as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"
        issuer = dict(x[0] for x in tls.getpeercert()["issuer"])
        assert issuer["commonName"] == "balancer test CA"
    # acme-tls/1 for a name without a challenge: no challenge certificate
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        alpn_connect(port, "app.test", ["acme-tls/1"])


@pytest.mark.parametrize("hello", [
    b"\x16\x03\x01\xff\xff" + b"\x01" * 100,  # claims a record longer than it sends
    b"\x16\x03\x01\x00\x05\x01\x00\xff\xff\xff",  # a ClientHello longer than its record
    b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00",  # cut inside the random
    bytes(range(256)) * 4,
])
def test_hostile_client_hellos_do_not_hurt_while_a_challenge_is_pending(
        site: Balancer, hello: bytes) -> None:
    with socket.create_connection(("127.0.0.1", site.ports["tls"]), timeout=5) as sock:
        sock.sendall(hello)
        start = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(4096):
                pass
        assert time.monotonic() - start < 4  # closed by client_header (1 s) at the latest
    with alpn_connect(site.ports["tls"], "alpn.test", ["acme-tls/1"]) as tls:
        assert tls.selected_alpn_protocol() == "acme-tls/1"


# parsing ClientHellos (no sockets) ------------------------------------------------
def client_hello(name: str | None, protocols: list[str]) -> bytes:
    """The ClientHello Python's ssl sends (first record), made in memory."""
    context = ssl._create_unverified_context()
    if protocols:
        context.set_alpn_protocols(protocols)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_parse_hello_finds_sni_and_alpn() -> None:
    hello = client_hello("alpn.test", ["acme-tls/1", "http/1.1"])
    assert parse_hello(hello) == ("alpn.test", ["acme-tls/1", "http/1.1"])
    assert parse_hello(client_hello(None, [])) == (None, [])
    for cut in (0, 1, 4, 5, 40, len(hello) - 1):
        assert parse_hello(hello[:cut]) is NEED_MORE
    assert parse_hello(b"GET / HTTP/1.1\r\n") is None


def test_parse_hello_never_raises_on_junk() -> None:
    hello = bytearray(client_hello("alpn.test", ["acme-tls/1"]))
    rng = random.Random(18)
    for _ in range(3000):
        mutated = bytearray(hello)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        result = parse_hello(bytes(mutated[:rng.randint(0, len(mutated))]))
        assert result is None or result is NEED_MORE or isinstance(result, tuple)
    for _ in range(500):
        junk = bytes([0x16]) + rng.randbytes(rng.randint(0, 600))
        parse_hello(junk)


def test_challenges_update_keeps_only_good_unexpired_records() -> None:
    challenges = Challenges()
    now = time.time()
    challenges.update({
        "a": http01(),
        "b": http01("bad token!", "x"),  # not base64url: never served
        "c": {**http01("expired"), "expires": now - 1},
        "d": {"type": "http-01", "token": "t"},  # no answer, no expiry
        "e": {**http01("nohost"), "host": None},  # no name to answer for
        "f": {**alpn01("alpn.test"), "key": "-----BEGIN PRIVATE KEY-----\nbad\n"},
    }, now)
    assert challenges.tokens == {TOKEN.encode(): (b"app.test", ANSWER.encode())}
    assert challenges.alpn == {}


def test_the_control_socket_makes_a_worker_serve_new_challenges_at_once(tmp_path: Path) -> None:
    """The issuer's fast path: its management process tells every worker to read the
    challenges now (`challenges` on the control socket), not within a second."""
    from balancer.control import ControlServer
    from balancer.server import Worker
    from balancer.settings import load_settings

    store = FileStore(str(tmp_path / "routes.json"))
    worker = Worker(load_settings(env={}), store)
    control = ControlServer(str(tmp_path), worker)
    try:
        store.acme().put_challenge(f"http-01:{TOKEN}", http01())
        store.acme().put_challenge("tls-alpn-01:alpn.test", alpn01("alpn.test"))
        assert worker.challenges.tokens == {}
        reply = control.answer("challenges")
        assert reply["challenges"] == 2
        assert worker.challenges.tokens == {TOKEN.encode(): (b"app.test", ANSWER.encode())}
        assert list(worker.challenges.alpn) == ["alpn.test"]
        store.acme().delete_challenge(f"http-01:{TOKEN}")
        assert control.answer("challenges")["challenges"] == 1
        assert worker.challenges.tokens == {}
    finally:
        control.close()
