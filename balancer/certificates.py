"""Certificates as the store keeps them (SPEC §9): checked before they are stored.

A record is ``{"chain": PEM, "key": PEM, "not_after": UNIX_TIME, "source": TEXT}``:
the leaf certificate first in ``chain``, then its intermediates; ``key`` the
leaf's private key (PEM, unencrypted).

Invariants:
* `check` refuses (`CertificateError`, with the reason) a key that does not
  match the leaf, a chain whose certificates are not each issued by the next
  (the leaf first, then its issuer, ...: TLS 1.2 clients need that order), a
  leaf whose names (subjectAltName DNS entries, wildcards included) do not
  cover the host (a subject's CN names nothing: `leaf_names`), an expired or
  not yet valid leaf, an encrypted key, a chain holding a private key or a
  block that is no whole certificate (a file cut short), keys other than
  RSA ≥ 2048 bits or ECDSA P-256/P-384, and a pair OpenSSL does not load as
  a worker will (`load_pem`).
* No message, repr or log line made here contains the private key.
* `cryptography` (~15 MiB) is imported by the functions that parse, at their
  first call: the management process imports this module always and a
  certificate only when one is stored or uploaded (`balancer.preload`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography import x509

MIN_RSA_BITS = 2048
CURVES = ("secp256r1", "secp384r1")
SOURCES = ("upload", "acme")
MAX_CHAIN_BYTES = 64 * 1024  # a leaf and its intermediates: a few KiB (`check_size`)
FACTS_KEPT = 100_000  # chains whose facts `chain_facts` keeps (~300 bytes each)
_FACTS: dict[bytes, dict[str, Any]] = {}  # sha256 of a chain: its facts
REFUSALS_KEPT = 100_000  # records whose `refused` verdict is kept (~150 bytes each)
_REFUSALS: dict[bytes, str | None] = {}  # sha256 of a record's key and chain: `refused`
# a load's errors that are the process's, not its record's (no descriptor or memory)
PROCESS_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM))


class CertificateError(ValueError):
    """Why a certificate cannot be stored or served (never containing the key)."""


@dataclass(frozen=True)
class CertificateInfo:
    """What a checked certificate says of itself (safe to show)."""

    names: tuple[str, ...]
    not_before: float
    not_after: float
    issuer: str
    key_type: str


def check(host: str, chain_pem: str, key_pem: str, now: float | None = None) -> CertificateInfo:
    """The leaf's info if `chain_pem` + `key_pem` may serve `host`; else CertificateError."""
    if not isinstance(chain_pem, str) or not isinstance(key_pem, str):
        raise CertificateError("chain and key must be PEM text")
    from cryptography import x509

    check_size(chain_pem)
    if "PRIVATE KEY-----" in chain_pem:
        raise CertificateError("chain: holds a private key; give the certificates only "
                               "(the key goes in key)")
    try:
        chain = x509.load_pem_x509_certificates(chain_pem.encode())
    except ValueError:
        raise CertificateError("chain: not a PEM certificate chain") from None
    begun = chain_pem.count("-----BEGIN ")
    if begun != len(chain):  # the PEM reader skips a cut or foreign block silently
        raise CertificateError(f"chain: {begun} PEM blocks, of which {len(chain)} whole "
                               f"certificates (is the file cut short?)")
    key = _private_key(key_pem)
    key_type = _key_type(key)
    _check_order(chain, _spki(key.public_key()))
    leaf = chain[0]
    names = leaf_names(leaf)
    if not covers(names, host):
        raise CertificateError(f"chain: the certificate is for {', '.join(names)}, not {host}"
                               if names else f"chain: {unnamed(leaf)}; reissue it with "
                               f"{host} in subjectAltName (DNS:{host})")
    now = time.time() if now is None else now
    not_before = leaf.not_valid_before_utc.timestamp()
    not_after = leaf.not_valid_after_utc.timestamp()
    if not_after <= now:
        raise CertificateError(f"chain: the certificate expired at "
                               f"{leaf.not_valid_after_utc.isoformat()}")
    if not_before > now:
        raise CertificateError(f"chain: the certificate is not valid before "
                               f"{leaf.not_valid_before_utc.isoformat()}")
    _check_loads(chain_pem, key_pem)
    return CertificateInfo(names, not_before, not_after, leaf.issuer.rfc4514_string(), key_type)


def check_size(chain_pem: str) -> None:
    """CertificateError for a chain over `MAX_CHAIN_BYTES`. Bug: a 1 MB chain (the
    leaf, then its CA 700 times: each issued by the next) was stored, took
    OpenSSL 0.4 s to load in each worker, in the loop, and every handshake of
    its host sent the client the whole of it."""
    if len(chain_pem) > MAX_CHAIN_BYTES:
        raise CertificateError(_too_big(chain_pem))


def _too_big(chain_pem: str) -> str:
    return (f"chain: {len(chain_pem)} bytes, more than the {MAX_CHAIN_BYTES // 1024} KiB a "
            f"chain may have (the leaf and its intermediates take a few KiB)")


def unservable(chain_pem: str, key_pem: str) -> str | None:
    """Why no worker can serve a stored record, as far as its text tells without
    parsing it (about 1.5 µs a record, interpreted, at load ~10: a few searches
    of its text, each from where a record puts what is looked for; reading the
    record's JSON takes 8-12 more): `balancer.stores.certs` asks at every read of the
    store, so a record written straight into it is reported when the balancer
    starts, not at its host's first handshake. None when it may be served
    (OpenSSL may still refuse it at the first handshake: a key of another
    certificate, a certificate's text damaged within its block: `refused`).
    Judged on what a worker loads (`load_pem`: the key's text, then the chain's),
    so a bundle in either field is served. Bug: the certificate was looked for
    in ``chain`` only and the key in ``key`` only: a bundle stored straight into
    the store (a HAProxy-style ``chain``, an empty ``key``), served until then,
    was refused at the balancer's next start. Never quotes the record."""
    if len(chain_pem) > MAX_CHAIN_BYTES:
        return _too_big(chain_pem)
    if chain_pem.find("-----BEGIN ", chain_pem.rfind("-----END ") + 1) >= 0:
        return "chain: cut short (no END line after its last BEGIN line)"
    if key_pem.find("-----BEGIN ", key_pem.rfind("-----END ") + 1) >= 0:
        return "key: cut short (no END line after its last BEGIN line)"
    if "CERTIFICATE-----" not in chain_pem and "CERTIFICATE-----" not in key_pem:
        return "chain: no PEM certificate"
    for text in (key_pem, chain_pem):  # OpenSSL takes the first private key block
        at = text.find("PRIVATE KEY-----")
        if at >= 0:
            line = text.rfind("\n", 0, at) + 1  # its "-----BEGIN RSA " (say) starts there
            if text.startswith("-----BEGIN ", line):
                if text.find("ENCRYPTED", line, at) >= 0 \
                        or text.find("Proc-Type: 4,ENCRYPTED", at, at + 48) >= 0:
                    return "key: the private key is encrypted"
                return None
    return "key: no PEM private key"


def refused(chain_pem: str, key_pem: str) -> str | None:
    """Why OpenSSL does not load a record that `unservable` passes (a key of
    another certificate, a certificate damaged within its PEM block), in the
    words a worker logs (`refusal`); None when it loads. The management process
    asks (`management.certs_watch`) so that `GET /api/v1/certs` names it;
    workers never do (their start would parse every record). The verdict is kept
    by the record's content: `cryptography` compares the served key and
    certificate, each certificate read whole (~200 µs), and only a pair it finds
    wrong, cannot read, or whose key or signature is weak (`_strong`) is loaded
    by OpenSSL (~3 ms), whose verdict is the one kept. Bug: such a record showed only in
    each worker's log, the listing naming it as served."""
    digest = hashlib.sha256(f"{key_pem}\0{chain_pem}".encode()).digest()
    if digest in _REFUSALS:
        return _REFUSALS[digest]
    try:
        why = None if _key_matches(chain_pem, key_pem) else _openssl_refusal(chain_pem, key_pem)
    except OSError as exc:
        if exc.errno in PROCESS_ERRORS:  # no finding on the record: asked again next time
            return None
        why = refusal(exc)
    if len(_REFUSALS) >= REFUSALS_KEPT:
        _REFUSALS.clear()
    _REFUSALS[digest] = why
    return why


def _key_matches(chain_pem: str, key_pem: str) -> bool:
    """Whether the first certificate and the first private key of what a worker
    loads (`load_pem`: the key's text, then the chain's) are one pair, as
    `cryptography` reads them, of keys strong enough (`_strong`); False when it
    cannot read either, or a key or signature is weak (OpenSSL then answers)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    text = f"{key_pem}\n{chain_pem}\n"
    block = _key_block(text)
    if not block or not _lines_end(text, "-----BEGIN ") or not _lines_end(text, "-----END "):
        return False
    try:
        certificates = x509.load_pem_x509_certificates(text.encode())
        key = serialization.load_pem_private_key(block.encode(), None,
                                                 unsafe_skip_rsa_key_validation=True)
        return _spki(key.public_key()) == _spki(certificates[0].public_key()) \
            and all(map(_strong, certificates))
    except Exception:  # noqa: BLE001 - OpenSSL judges what `cryptography` cannot read
        return False  # (bug: its InvalidVersion, a damaged version byte, is no
        # ValueError: it failed every read of the store, the watch's, the API's)


def _key_block(text: str) -> str:
    """The first private key's PEM block in `text` ("" if none is whole), found
    in one pass (bug: a regular expression took 22 s, the management process
    answering nothing, over a 290 KB key text of BEGIN and END lines that did
    not pair)."""
    start = text.find("-----BEGIN ")
    while start >= 0:
        close = text.find("-----", start + 11)  # at the latest, the next BEGIN's
        label = text[start + 11:close]
        if close >= 0 and label.endswith("PRIVATE KEY"):
            end = text.find(f"-----END {label}-----", close)
            return text[start:end + len(label) + 14] if end >= 0 else ""
        start = text.find("-----BEGIN ", start + 11)
    return ""


def _lines_end(text: str, marker: str) -> bool:
    """Whether each of `text`'s `marker` lines ends at its closing dashes, as
    OpenSSL reads them (`cryptography` takes an END line with text after it:
    OpenSSL refuses it, BAD_END_LINE)."""
    at = text.find(marker)
    while at >= 0:
        close = text.find("-----", at + len(marker))
        if close < 0 or text[close + 5:close + 6] not in ("\n", "\r"):
            return False
        at = text.find(marker, close + 5)
    return True


def _strong(certificate: Any) -> bool:
    """Whether OpenSSL's default security level (112 bits) takes `certificate` as
    far as `cryptography` tells: a key of 2048 bits or more (RSA, DSA), 224 or
    more (EC), and no MD5 or SHA-1 signature; else OpenSSL is asked (`refused`).
    Bug: a matching pair it refuses on load (EE_KEY_TOO_SMALL: a 1024-bit RSA
    key) was listed as served."""
    key = certificate.public_key()
    # read whole (bug: one damaged by a letter within its DER was listed as served)
    certificate.subject, certificate.issuer, certificate.extensions  # noqa: B018
    curve = getattr(key, "curve", None)  # (EC)
    size = getattr(curve or key, "key_size", None)  # (none: Ed25519, Ed448)
    algorithm = getattr(certificate.signature_hash_algorithm, "name", "")
    return (size is None or size >= (224 if curve else 2048)) and algorithm not in ("md5", "sha1")


def _openssl_refusal(chain_pem: str, key_pem: str) -> str | None:
    """`refused` as OpenSSL, loading the pair as a worker does, answers it."""
    try:
        load_pem(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), chain_pem, key_pem)
    except (ssl.SSLError, ValueError) as exc:
        return refusal(exc)
    return None


def refusal(exc: BaseException) -> str:
    """Why a record did not load, without any of its text."""
    if isinstance(exc, ssl.SSLError):
        return f"OpenSSL refused it ({exc.reason or exc.library or 'unknown reason'})"
    if isinstance(exc, CertificateError):  # (never quotes the record)
        return str(exc)
    return type(exc).__name__


def _check_loads(chain_pem: str, key_pem: str) -> None:
    """CertificateError unless OpenSSL loads the pair as every worker will
    (`load_pem`). Bug: what `cryptography` takes and OpenSSL does not (a key
    field holding a certificate before the key, as a combined PEM file does; a
    NUL in the key) was stored and answered 200, then every worker refused it
    ("key values mismatch"): the host went on with the certificate served before,
    or none, while the API listed the new one. A memory file this process cannot
    write (its file size limit, as a full disk) is no finding on the pair: the
    store's write, refused the same way, says why."""
    try:
        load_pem(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), chain_pem, key_pem)
    except (ssl.SSLError, ValueError) as exc:
        raise _refused(exc, key_pem) from None
    except OSError:
        return


def _refused(exc: Exception, key_pem: str) -> CertificateError:
    """The refusal of a pair OpenSSL did not load (`exc`: its reason, no key text)."""
    why = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__
    hint = ("; key holds a certificate: give the private key alone (the certificates "
            "go in chain)") if "-----BEGIN CERTIFICATE" in key_pem else ""
    return CertificateError(f"OpenSSL cannot load the chain and key ({why}){hint}")


def _no_password() -> bytes:
    """The password OpenSSL gets for an encrypted key: none. Bug: without one it
    asked for it on the terminal (a stored-straight encrypted key: a worker run
    in a terminal waited there; else an OSError, tried again at every handshake)."""
    return b""


def load_pem(context: ssl.SSLContext, chain: str, key: str) -> None:
    """Load a PEM chain and key into `context` through an anonymous memory file
    (what a worker serves: the key's file first, so OpenSSL takes the first
    certificate of the key's text, if it holds one, for the leaf)."""
    fd = os.memfd_create("balancer-certificate", os.MFD_CLOEXEC)
    try:
        data = memoryview(f"{key}\n{chain}\n".encode())
        while data:  # a short write (a file size limit) is no whole file: the next raises
            data = data[os.write(fd, data):]
        path = f"/proc/self/fd/{fd}"
        context.load_cert_chain(path, path, password=_no_password)
    finally:
        os.close(fd)


def _private_key(key_pem: str) -> Any:
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(key_pem.encode(), password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        raise CertificateError("key: the private key is encrypted; give it unencrypted "
                               "(openssl pkey -in KEY -out PLAIN_KEY)") from None
    except ValueError:
        raise CertificateError("key: not an unencrypted PEM private key") from None


def _spki(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(public_key.public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo))


def _check_order(chain: list[x509.Certificate], key_spki: bytes) -> None:
    """The key's certificate first, then each certificate's issuer (a root at the
    end may be there or not); CertificateError naming the first one out of place."""
    if _spki(chain[0].public_key()) != key_spki:
        for number, cert in enumerate(chain[1:], 2):
            if _spki(cert.public_key()) == key_spki:
                raise CertificateError(f"chain: the certificate the key matches is number "
                                       f"{number} of {len(chain)}; put it first, then the "
                                       f"certificate that issued it, and so on")
        raise CertificateError("key: does not match the chain's first certificate")
    for number, (cert, issuer) in enumerate(zip(chain, chain[1:], strict=False), 1):
        if not _issued_by(cert, issuer):
            raise CertificateError(
                f"chain: certificate {number + 1} ({issuer.subject.rfc4514_string()}) did not "
                f"issue certificate {number} ({cert.subject.rfc4514_string()}); give the "
                f"leaf first, then the certificate that issued it, and so on")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer` signed `cert` (True when its key type cannot be checked here)."""
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, InvalidSignature):
        return False
    except (TypeError, UnsupportedAlgorithm):
        return True
    return True


def _key_type(key: Any) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise CertificateError(f"key: RSA keys must have at least {MIN_RSA_BITS} bits, "
                                   f"this one has {key.key_size}")
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in CURVES:
            raise CertificateError(f"key: ECDSA keys must be on P-256 or P-384, "
                                   f"not {key.curve.name}")
        return "ECDSA " + {"secp256r1": "P-256", "secp384r1": "P-384"}[key.curve.name]
    raise CertificateError("key: must be RSA (2048 bits or more) or ECDSA P-256/P-384")


def leaf_names(leaf: x509.Certificate) -> tuple[str, ...]:
    """The DNS names of a certificate: its subjectAltName's, none without one (the
    subject's CN names no host, as browsers and Go have read it since 2017 and
    RFC 9525 says; bug: a certificate naming its host only there was stored and
    served, and those clients refused it: `unnamed` says why);
    CertificateError when its extensions cannot be read (bug: a malformed one, a
    subjectAltName cut short or of non-ASCII bytes, answered an upload 500 with a
    traceback in the log)."""
    from cryptography import x509
    from cryptography.x509.oid import ExtensionOID

    try:
        san: Any = leaf.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
        return tuple(n.lower() for n in san.value.get_values_for_type(x509.DNSName))
    except ValueError as exc:  # `cryptography` parses the extensions only now
        raise CertificateError(f"chain: the certificate's extensions cannot be read "
                               f"({exc})") from None
    except x509.ExtensionNotFound:
        return ()


def unnamed(leaf: x509.Certificate) -> str:
    """Why a certificate with no DNS name (`leaf_names`) serves no host."""
    from cryptography import x509

    cns = leaf.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    try:
        leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        if cns:
            return (f"the certificate has no subjectAltName, only the subject's "
                    f"CN={cns[0].value!s}, which browsers and Go clients do not accept "
                    f"as a name")
    return "the certificate names no host (no DNS name in its subjectAltName)"


def covers(names: tuple[str, ...], host: str) -> bool:
    """Whether a certificate for `names` is valid for `host` (one-label wildcards).
    A stored wildcard host (``*.example.com``) needs the wildcard name itself."""
    host = host.lower()
    for name in names:
        if name == host:
            return True
        if name.startswith("*.") and not host.startswith("*."):
            first, _, rest = host.partition(".")
            if first and rest == name[2:]:
                return True
    return False


def public_record(host: str, record: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """What the API and `balancerctl cert list` show of a stored record: never the key."""
    now = time.time() if now is None else now
    shown: dict[str, Any] = {"host": host, "source": record.get("source", ""),
                             "not_after": record.get("not_after")}
    facts = chain_facts(served_chain(record))
    shown.update(facts)
    if "names" in facts:
        shown["names"] = list(facts["names"])
    if isinstance(shown["not_after"], (int, float)):
        shown["expires_in"] = round(shown["not_after"] - now)
    return shown


def served_chain(record: dict[str, Any]) -> str:
    """The text whose first certificate a worker serves of `record` (`load_pem`:
    the key's text, then the chain's): the chain, or, when the key's text holds
    a certificate (a bundle stored straight, in ``key``), the two. Bug: the
    listing read ``chain`` only, and said "the stored chain cannot be read" of
    a bundle with an empty ``chain`` that every worker served."""
    chain, key = str(record.get("chain", "")), str(record.get("key", ""))
    return f"{key}\n{chain}" if "CERTIFICATE-----" in key else chain


def chain_facts(chain: str) -> dict[str, Any]:
    """What a chain's leaf says (names, issuer, not_after; a problem), kept by
    the chain's content: each `/metrics` scrape and certificate listing parsed
    every stored chain again (~70 µs each: 1.5 s at 20,000 certificates). A
    changed chain is another key; `keep_facts` drops those no longer stored.
    The caller must not change what it returns."""
    digest = hashlib.sha256(chain.encode()).digest()
    facts = _FACTS.get(digest)
    if facts is None:
        facts = _read_chain(chain)
        if len(_FACTS) >= FACTS_KEPT:
            _FACTS.clear()
        _FACTS[digest] = facts
    return facts


def keep_facts(chains: Iterable[str]) -> None:
    """Forget the facts of every chain but `chains` (those stored now)."""
    kept = {hashlib.sha256(chain.encode()).digest() for chain in chains}
    for digest in list(_FACTS):  # a copy in one step: another thread may add meanwhile
        if digest not in kept:
            _FACTS.pop(digest, None)


def _read_chain(chain: str) -> dict[str, Any]:
    """`chain_facts` parsed."""
    from cryptography import x509

    facts: dict[str, Any] = {}
    try:
        leaf = x509.load_pem_x509_certificates(chain.encode())[0]
        facts["names"] = leaf_names(leaf)
        if not facts["names"]:  # (stored straight, or before such uploads were refused)
            facts["problem"] = unnamed(leaf)
        facts["issuer"] = leaf.issuer.rfc4514_string()
        facts["not_after"] = leaf.not_valid_after_utc.timestamp()
    except Exception:  # noqa: BLE001 - (bug: its InvalidVersion, no ValueError, failed
        facts["problem"] = "the stored chain cannot be read"  # every listing, /metrics)
    return facts


def make_record(host: str, chain_pem: str, key_pem: str, source: str = "upload") -> dict[str, Any]:
    """A checked record ready for the store (CertificateError if it may not serve `host`)."""
    info = check(host, chain_pem, key_pem)
    return {"chain": chain_pem, "key": key_pem, "not_after": info.not_after, "source": source}
