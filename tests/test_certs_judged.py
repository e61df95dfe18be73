"""What the management process judges of stored certificate records, in-process
(`balancer.certificates.unservable` and `refused`, `Certs.all`; docs/tls.md).

`unservable` was reworked for speed: generated texts get the verdicts of the
code it replaced (14bf701). `refused` asks OpenSSL only of a pair `cryptography`
finds wrong: every pair OpenSSL refuses must be among those. A read of the
store that yields while it judges must not undo what a later write noted.
"""

from __future__ import annotations

import base64
import json
import random
import time
from pathlib import Path

import gevent
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from balancer.certificates import MAX_CHAIN_BYTES, _openssl_refusal, refused, unservable
from balancer.stores.file import FileStore
from management.certs_api import list_certs
from management.certs_watch import JUDGED_BATCH, refused_records
from tests.test_tls import CA


def unservable_14bf701(chain_pem: str, key_pem: str) -> str | None:
    """`unservable` as it was before its rework (the reference of its verdicts)."""
    if len(chain_pem) > MAX_CHAIN_BYTES:
        return (f"chain: {len(chain_pem)} bytes, more than the {MAX_CHAIN_BYTES // 1024} KiB a "
                f"chain may have (the leaf and its intermediates take a few KiB)")
    for field, text in (("chain", chain_pem), ("key", key_pem)):
        last_end = text.rfind("-----END ")
        if text.find("-----BEGIN ", max(last_end, 0)) >= 0:
            return f"{field}: cut short (no END line after its last BEGIN line)"
    if "CERTIFICATE-----" not in chain_pem and "CERTIFICATE-----" not in key_pem:
        return "chain: no PEM certificate"
    for text in (key_pem, chain_pem):
        at = text.find("PRIVATE KEY-----")
        label = text[text.rfind("\n", 0, at) + 1:at]
        if at >= 0 and label.startswith("-----BEGIN "):
            if "ENCRYPTED" in label or "Proc-Type: 4,ENCRYPTED" in text[at:at + 48]:
                return "key: the private key is encrypted"
            return None
    return "key: no PEM private key"


PIECES = ("-----BEGIN ", "-----END ", "CERTIFICATE-----", "PRIVATE KEY-----", "RSA ", "EC ",
          "ENCRYPTED ", "Proc-Type: 4,ENCRYPTED", "\n", "\r\n", "-", "-----", "x", "MIIB", " ")


def text(rng: random.Random) -> str:
    return "".join(rng.choices(PIECES, k=rng.randrange(24)))


def test_unservable_gives_the_verdicts_it_gave_before_its_rework() -> None:
    """10,000 pairs of texts made of the pieces both versions look for."""
    rng = random.Random(0)
    verdicts = set()
    for n in range(10_000):
        chain, key = text(rng), text(rng)
        if n % 500 == 0:  # over the size bound
            chain += "x" * (MAX_CHAIN_BYTES - len(chain) + 1)
        verdicts.add(unservable_14bf701(chain, key))
        assert unservable(chain, key) == unservable_14bf701(chain, key), (chain, key)
    assert len(verdicts) == 7  # each verdict (None included) was met


def test_unservable_gives_the_old_verdicts_on_real_records() -> None:
    chain, key = CA.issue("a.test")
    locked = key.replace("BEGIN PRIVATE KEY", "BEGIN ENCRYPTED PRIVATE KEY")
    for pair in ((chain, key), (chain + key, ""), ("", key + chain), (key, chain),
                 (chain, locked), (chain[:200], key), (chain, "")):
        assert unservable(*pair) == unservable_14bf701(*pair)


WEAK_KEYS = {"rsa-1024": lambda: rsa.generate_private_key(65537, 1024),
             "ec-p192": lambda: ec.generate_private_key(ec.SECP192R1())}


@pytest.mark.parametrize("kind", sorted(WEAK_KEYS))
def test_a_matching_pair_openssl_refuses_is_judged_refused(kind: str) -> None:
    """Bug: `cryptography` found the key and certificate one pair, so OpenSSL was
    not asked, and the listing named as served a record every worker refused
    (EE_KEY_TOO_SMALL: a key below OpenSSL's default security level)."""
    chain, key = CA.issue("weak.test", key=WEAK_KEYS[kind]())
    openssl = _openssl_refusal(chain, key)
    assert openssl is not None and openssl.startswith("OpenSSL refused it (")
    assert refused(chain, key) == openssl


def test_a_read_judging_records_does_not_undo_a_later_write(tmp_path: Path) -> None:
    """A read of the store that yields while it judges its records (`refused_records`,
    `JUDGED_BATCH` at a time) and ends after a write made meanwhile: the written
    record stays the one last read in good order. Bug: the older read replaced
    it (a restore would have written the old certificate back)."""
    chain, key = CA.issue("a.test")
    record = {"chain": chain, "key": key, "not_after": 0, "source": "upload"}
    path = tmp_path / "routes.json.certs.json"  # the read yields once between its records
    path.write_text(json.dumps({"certs": {f"h{n}.test": record for n in range(JUDGED_BATCH + 1)}}))
    path.chmod(0o600)
    certs = FileStore(str(tmp_path / "routes.json")).certs()
    certs.keep, certs.refusing = True, refused_records
    certs.all()
    newer = {"chain": chain, "key": key, "not_after": 1, "source": "upload"}
    reading = gevent.spawn(certs.all)
    gevent.sleep(0)  # the read is judging its records: the write comes meanwhile
    assert not reading.ready()
    certs.put("h0.test", newer)
    reading.get(timeout=10)
    assert certs.last_good is not None and certs.last_good["h0.test"] == newer


def bad_version(chain: str) -> str:
    """`chain` with its leaf's X.509 version byte damaged (62: `cryptography`'s
    InvalidVersion, which is no ValueError; OpenSSL loads it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der = x509.load_pem_x509_certificate(chain.encode()).public_bytes(Encoding.DER)
    at = der.find(bytes.fromhex("a003020102"))
    der = der[:at] + bytes.fromhex("a00302013e") + der[at + 5:]
    text = base64.b64encode(der).decode()
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(
        text[n:n + 64] for n in range(0, len(text), 64)) + "\n-----END CERTIFICATE-----\n"


def test_a_record_cryptography_cannot_read_fails_no_read_of_the_store(tmp_path: Path) -> None:
    """A certificate whose version byte is damaged: judged by OpenSSL, listed with
    a problem, the other host listed as it is. Bug: `cryptography`'s InvalidVersion
    escaped `refused` and `chain_facts`: every read of the store by the management
    process failed (its watch, `GET /api/v1/certs`, `/metrics`, the ACME issuer)."""
    chain, key = CA.issue("a.test")
    damaged = bad_version(chain)
    assert refused(damaged, key) == _openssl_refusal(damaged, key)
    path = tmp_path / "routes.json.certs.json"
    path.write_text(json.dumps({"certs": {
        host: {"chain": text, "key": key, "not_after": 0, "source": "upload"}
        for host, text in (("a.test", chain), ("b.test", damaged))}}))
    path.chmod(0o600)
    store = FileStore(str(tmp_path / "routes.json"))
    store.certs().refusing = refused_records
    listed = {c["host"]: c for c in list_certs(store)[0]}
    assert listed["a.test"]["names"] == ["a.test"]
    assert listed["b.test"]["problem"] == "the stored chain cannot be read"


def test_records_damaged_within_their_blocks_get_openssls_verdict() -> None:
    """A letter changed within the leaf's DER, text after an END line: `refused`
    gives OpenSSL's verdict. Bug: `cryptography` read them (lazily, or leniently),
    found the pair matching, and the listing named them as served."""
    chain, key = CA.issue("a.test")
    lines = chain.split("\n")
    lines[2] = lines[2][:20] + ("A" if lines[2][20] != "A" else "B") + lines[2][21:]
    records = [("\n".join(lines), key), (chain, key.rstrip("\n") + "+\n"),
               (chain.replace("-----END CERTIFICATE-----\n", "-----END CERTIFICATE-----9", 1),
                key)]
    for pair in records:
        assert unservable(*pair) is None
        assert refused(*pair) == _openssl_refusal(*pair)
    assert _openssl_refusal(*records[2]) is not None


def test_a_long_key_text_of_unpaired_lines_is_judged_in_one_pass() -> None:
    """150 KB of BEGIN and END lines that do not pair, in `key`: judged in well under
    a second. Bug: a regular expression looked for the key's block from each
    BEGIN line to the text's end (22 s at 290 KB, the management process
    answering nothing meanwhile)."""
    chain, _ = CA.issue("a.test")
    key = "-----BEGIN A PRIVATE KEY-----\n-----END B PRIVATE KEY-----\n" * 2_600
    started = time.monotonic()
    assert refused(chain, key) is not None
    assert time.monotonic() - started < 1.0
