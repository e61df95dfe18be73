"""Certificate contexts built at a host's first handshake (`balancer.tls_certs`),
through real TLS handshakes on loopback sockets: a worker's `TLSFront` in this
process serves each accepted connection in a thread, a Python client verifies
what it gets. Hostile records (garbage, a key of another certificate, 1 MB
long, expired) and names no certificate covers."""

from __future__ import annotations

import logging
import os
import resource
import socket
import ssl
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from balancer import tls_certs
from balancer.certificates import CertificateError, check, make_record
from balancer.settings import load_settings
from balancer.tls import TLSFront
from tests.tlsca import TestCA

CA = TestCA()
HOSTS = [f"h{n}.test" for n in range(40)]


@pytest.fixture(scope="module")
def records() -> dict[str, dict[str, Any]]:
    return {host: make_record(host, *CA.issue(host)) for host in HOSTS}


class Served:
    """A TLS listener on loopback whose handshakes `front` makes, one thread each."""

    def __init__(self, front: TLSFront) -> None:
        self.front = front
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self.accept_loop, daemon=True)
        self.thread.start()

    def accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with sock:
                sock.settimeout(10)
                try:
                    with self.front.context.wrap_socket(sock, server_side=True) as tls:
                        tls.sendall(b"ok")
                except (ssl.SSLError, OSError):
                    pass

    def names(self, sni: str, tmp: Path) -> list[str]:
        """The DNS names of the certificate served for `sni` (verified); raises
        `ssl.SSLError` when the handshake fails."""
        context = ssl.create_default_context(cafile=str(CA.write(tmp)))
        context.check_hostname = False
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname=sni) as tls:
            assert tls.recv(2) == b"ok"
            return [value for kind, value in tls.getpeercert()["subjectAltName"]]

    def close(self) -> None:
        self.listener.close()


def a_front(default_host: str = "") -> TLSFront:
    settings = load_settings(env={"BALANCER_TLS_DEFAULT_HOST": default_host})
    return TLSFront(settings.tls, {"ok": 0, "no_certificate": 0, "protocol_error": 0,
                                   "timeout": 0})


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The chains `ServedCerts` builds a context of, in order (the first name of each)."""
    built: list[str] = []
    load = tls_certs.ServedCerts.load

    def counting(self: Any, record: Any) -> ssl.SSLContext:
        built.append(str(record.get("chain", ""))[:40])
        return load(self, record)

    monkeypatch.setattr(tls_certs.ServedCerts, "load", counting)
    return built


@pytest.fixture
def serve() -> Iterator[Any]:
    made: list[Served] = []

    def start(front: TLSFront) -> Served:
        made.append(Served(front))
        return made[-1]

    yield start
    for served in made:
        served.close()


def test_start_builds_nothing_and_a_host_is_built_once(
        records: dict[str, Any], counted: list[str], serve: Any, tmp_path: Path) -> None:
    """Bug: every stored certificate's context was built at a worker's start (~3 ms
    each: 5,000 certificates, 17 s of CPU per worker before its first handshake)."""
    front = a_front()
    front.update(records)
    assert counted == [] and front.certs.contexts == {}
    served = serve(front)
    for _ in range(3):
        assert served.names("h7.test", tmp_path) == ["h7.test"]
        assert served.names("H3.Test.", tmp_path) == ["h3.test"]
    assert len(counted) == 2 and set(front.certs.contexts) == {"h7.test", "h3.test"}


def test_names_no_certificate_covers_build_and_keep_nothing(
        records: dict[str, Any], counted: list[str], serve: Any, tmp_path: Path) -> None:
    front = a_front(default_host="h0.test")
    front.update(records)
    served = serve(front)
    for _ in range(200):
        assert served.names(f"{uuid.uuid4().hex}.test", tmp_path) == ["h0.test"]
    assert len(counted) == 1 and list(front.certs.contexts) == ["h0.test"]
    bare = a_front()  # no default host: unrecognized_name, nothing built
    bare.update(records)
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        serve(bare).names("stranger.test", tmp_path)
    assert bare.certs.contexts == {}


def kept(front: TLSFront, count: int) -> TLSFront:
    """`front` keeping at most `count` contexts built (`ServedCerts.kept`)."""
    front.certs = tls_certs.ServedCerts(front.new_context, kept=count)
    return front


def test_contexts_kept_are_bounded_the_least_recently_used_going_first(
        records: dict[str, Any], counted: list[str], serve: Any, tmp_path: Path) -> None:
    front = kept(a_front(), 3)
    front.update(records)
    served = serve(front)
    for host in HOSTS[:5]:
        assert served.names(host, tmp_path) == [host]
    assert list(front.certs.contexts) == HOSTS[2:5]
    assert served.names(HOSTS[0], tmp_path) == [HOSTS[0]]  # built again
    assert list(front.certs.contexts) == [*HOSTS[3:5], HOSTS[0]] and len(counted) == 6
    assert served.names(HOSTS[3], tmp_path) == [HOSTS[3]]  # used: the newest again
    assert served.names(HOSTS[1], tmp_path) == [HOSTS[1]]
    assert list(front.certs.contexts) == [HOSTS[0], HOSTS[3], HOSTS[1]] and len(counted) == 7


def test_a_host_in_use_survives_a_sweep_of_10000_other_names(
        records: dict[str, Any], counted: list[str], serve: Any, tmp_path: Path) -> None:
    """A client naming thousands of hosts in turn (stored ones, more than the
    contexts kept, and names no certificate covers), while another keeps
    handshaking for one host: that host's context stays built. Bug: the oldest
    built went first, so every `kept` builds the busy host was built again
    (~3 ms of a worker's CPU per handshake). The sweep goes through `find`
    (what the SNI callback runs, as many real handshakes would take 10 s), the
    busy host through real handshakes."""
    front = kept(a_front(), 8)
    front.update(records)
    served = serve(front)
    busy, others = HOSTS[0], HOSTS[1:]
    assert served.names(busy, tmp_path) == [busy]
    context = front.certs.contexts[busy]
    for n in range(10_200):
        name = others[n // 50 % len(others)] if n % 50 == 0 else f"{uuid.uuid4().hex}.test"
        assert (front.find(name) is None) == (n % 50 != 0)
        if n % 100 == 99:
            assert served.names(busy, tmp_path) == [busy]
            assert front.certs.contexts[busy] is context  # not built again
    assert len(front.certs.contexts) == 8 and len(counted) == 1 + 204
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        served.names("stranger.test", tmp_path)


def hostile(kind: str, host: str) -> dict[str, Any]:
    """A record stored straight into the store (no upload check) for `host`."""
    chain, key = CA.issue(host)
    if kind == "garbage":
        return {"chain": "-----BEGIN CERTIFICATE-----\nnot base64 at all\n", "key": key}
    if kind == "other key":
        return {"chain": chain, "key": CA.issue(host)[1]}
    if kind == "encrypted key":
        encrypted = serialization.load_pem_private_key(key.encode(), None).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"))
        return {"chain": chain, "key": encrypted.decode()}
    return {"chain": chain + CA.pem * (1_000_000 // len(CA.pem)), "key": key}  # 1 MB


@pytest.mark.parametrize("kind, reason", [
    ("garbage", "OpenSSL refused it ("),
    ("other key", "OpenSSL refused it (KEY_VALUES_MISMATCH)"),
    ("encrypted key", "OpenSSL refused it ("),  # (bug: asked on the terminal: OSError)
    ("1 MB", "chain: 100"),
])
def test_a_refused_record_is_tried_once_logged_once_and_the_default_served(
        records: dict[str, Any], counted: list[str], serve: Any, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, kind: str, reason: str) -> None:
    """Stored straight before the worker started: its host's handshakes get
    `tls.default_host`'s certificate (docs/tls.md); OpenSSL is asked once, the
    log says why once (never quoting the record), the other hosts are served."""
    front = a_front(default_host="h0.test")
    front.update({**records, "bad.test": hostile(kind, "bad.test")})
    served = serve(front)
    with caplog.at_level(logging.INFO, logger="balancer"):
        for _ in range(5):
            assert served.names("bad.test", tmp_path) == ["h0.test"]
            assert served.names("h1.test", tmp_path) == ["h1.test"]
    said = [r.getMessage() for r in caplog.records if "bad.test" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"certificate of bad.test not served: {reason}")
    assert "PRIVATE" not in said[0] and "BEGIN" not in said[0]
    assert len(counted) == 3  # bad.test once, then h0.test and h1.test


def test_a_1mb_chain_is_refused_at_upload() -> None:
    record = hostile("1 MB", "big.test")
    with pytest.raises(CertificateError, match=r"^chain: \d+ bytes, more than the 64 KiB"):
        check("big.test", record["chain"], record["key"])


def test_an_expired_certificate_is_served_as_stored(
        records: dict[str, Any], serve: Any, tmp_path: Path) -> None:
    """Expired while stored (or written straight): served, as nginx and HAProxy
    do (the client decides); `balancerctl cert list` says EXPIRED."""
    chain, key = CA.issue("old.test", days=1, start_days=-3)
    front = a_front()
    front.update({**records, "old.test": {"chain": chain, "key": key}})
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate has expired"):
        serve(front).names("old.test", tmp_path)
    assert list(front.certs.contexts) == ["old.test"]  # built at its first handshake


def test_a_record_replaced_while_served_is_built_at_once(
        records: dict[str, Any], counted: list[str], serve: Any, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """After start, a change is built when it arrives (as before): a good one is
    served from the next handshake, one OpenSSL refuses keeps the one before."""
    front = a_front()
    front.update(records)
    served = serve(front)
    assert served.names("h2.test", tmp_path) == ["h2.test"]
    both = make_record("h2.test", *CA.issue("h2.test", "www.h2.test"))
    front.update({**records, "h2.test": both})
    assert len(counted) == 2
    assert served.names("h2.test", tmp_path) == ["h2.test", "www.h2.test"]
    with caplog.at_level(logging.INFO, logger="balancer"):
        front.update({**records, "h2.test": hostile("other key", "h2.test")})
        assert served.names("h2.test", tmp_path) == ["h2.test", "www.h2.test"]
    assert [r.getMessage() for r in caplog.records] == [
        "certificate of h2.test not served: OpenSSL refused it (KEY_VALUES_MISMATCH); "
        "keeping the one loaded before"]


def test_a_build_out_of_descriptors_is_tried_again_at_the_next_handshake(
        records: dict[str, Any]) -> None:
    """A worker at its descriptor limit (a flood of connections) cannot make the
    memory file a build reads: the host is not served then, and is built at its
    next handshake once descriptors are free. Bug: the record was taken for one
    OpenSSL refuses, and its host went unserved by that worker until the record
    changed."""
    front = a_front()  # (asked as the SNI callback asks it: a handshake would need
    front.update(records)  # descriptors of its own while none are left)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
    try:
        with pytest.raises(OSError):
            for _ in range(64):  # bounded: the limit is a few descriptors away
                held.append(os.open("/dev/null", os.O_RDONLY))
        assert front.certs.context("h5.test") is None
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert front.find("h5.test") is front.certs.contexts["h5.test"]


def test_a_refused_record_is_no_certificate_to_the_fronting_check(
        records: dict[str, Any], serve: Any, tmp_path: Path) -> None:
    """A name whose record OpenSSL refuses gets `tls.default_host`'s certificate
    (docs/tls.md): with `tls.refuse_domain_fronting` that connection serves the
    default host only, as for a name with no certificate. Bug: it was taken for
    the refused name's connection: `Host: h0.test` got a 421, `Host: bad.test`
    was served on h0.test's certificate."""
    front = a_front(default_host="h0.test")
    front.update({**records, "bad.test": hostile("garbage", "bad.test"),
                  "*.wild.test": hostile("other key", "*.wild.test")})
    served = serve(front)
    for name in ("bad.test", "x.wild.test"):
        assert served.names(name, tmp_path) == ["h0.test"]
        got = front.served_host(name)
        assert got == "h0.test"
        assert front.certs.matches_sni(got, b"h0.test")
        assert not front.certs.matches_sni(got, name.encode())


def served_der(served: Served, sni: str, tmp: Path) -> bytes:
    """The certificate (DER) a handshake naming `sni` gets."""
    context = ssl.create_default_context(cafile=str(CA.write(tmp)))
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=sni) as tls:
        return tls.getpeercert(binary_form=True) or b""


def test_a_context_evicted_while_an_update_builds_is_not_built_of_the_old_record(
        records: dict[str, Any], serve: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """While an update builds the changed records (the loop serves handshakes
    between two: `turn`), handshakes for the other hosts push a changed host's
    new context out (least recently used) and its next handshake builds it
    again, of the record served until the update ends: the old one. Once the
    update ends that host serves its new certificate. Bug: the context built of
    the old record stayed, and the host served its replaced certificate until
    that context was pushed out in turn."""
    front = kept(a_front(), 3)
    old = {h: records[h] for h in HOSTS[:4]}
    front.update(old)
    served = serve(front)
    for host in HOSTS[:3]:
        served_der(served, host, tmp_path)
    new = {**old, **{h: make_record(h, *CA.issue(h)) for h in HOSTS[:2]}}
    turns: list[int] = []

    def handshakes_meanwhile() -> None:  # what the loop serves at the second turn
        turns.append(len(turns))
        if len(turns) == 2:  # h0 rebuilt and kept; h1 next
            for host in (HOSTS[1], HOSTS[2], HOSTS[3], HOSTS[0]):
                served_der(served, host, tmp_path)

    monkeypatch.setattr(tls_certs, "turn", handshakes_meanwhile)
    front.update(new)
    assert len(turns) == 2
    for host in HOSTS[:2]:
        leaf = x509.load_pem_x509_certificate(new[host]["chain"].encode())
        assert served_der(served, host, tmp_path) == leaf.public_bytes(
            serialization.Encoding.DER), f"{host}: the replaced certificate served"
