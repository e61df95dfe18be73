"""A test certificate authority made with `cryptography`: a root, and leaf
certificates (ECDSA P-256 by default) for any names, as PEM text.

The certificates carry the extensions RFC 5280 asks for (the root's key usage
and subject key identifier, each leaf's authority key identifier): Python 3.13's
`ssl.create_default_context` verifies with ``VERIFY_X509_STRICT``, which refuses
certificates without them ("Missing Authority Key Identifier"), as do the test
clients built on it. ``TestCA(bare=True)`` leaves them out: the certificates a
minimal private CA makes, which the balancer's backend connections must still
accept on every Python version (balancer/backend_tls.py)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

# a root's key usage (RFC 5280 4.2.1.3): signs certificates and CRLs only
CA_KEY_USAGE = x509.KeyUsage(digital_signature=False, content_commitment=False,
                             key_encipherment=False, data_encipherment=False,
                             key_agreement=False, key_cert_sign=True, crl_sign=True,
                             encipher_only=False, decipher_only=False)


def _pem_key(key: Any) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _pem_cert(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class TestCA:
    """A self-signed root that issues leaf certificates."""

    __test__ = False  # not a pytest class

    def __init__(self, name: str = "balancer test CA", bare: bool = False) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.bare = bare
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                   .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=3650))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), True))
        if not bare:
            builder = (builder.add_extension(CA_KEY_USAGE, True).add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), False))
        self.cert = builder.sign(self.key, hashes.SHA256())
        self.pem = _pem_cert(self.cert)

    def write(self, directory: Path) -> Path:
        """The root as a PEM file (for clients to trust)."""
        path = directory / "test-ca.pem"
        path.write_text(self.pem)
        return path

    def issue(self, *names: str, key: Any = None, days: float = 90,
              start_days: float = -1, ips: tuple[str, ...] = (), san: bool = True
              ) -> tuple[str, str]:
        """(chain PEM, key PEM) of a leaf for `names` valid from `start_days` for `days`
        (not `san`: the first name in the subject's CN alone, a legacy certificate)."""
        key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
        leaf = self.certify(key.public_key(), *names, days=days, start_days=start_days, ips=ips,
                            san=san)
        return leaf + self.pem, _pem_key(key)

    def certify(self, public_key: Any, *names: str, days: float = 90, start_days: float = -1,
                ips: tuple[str, ...] = (), san: bool = True) -> str:
        """The PEM of a leaf certifying `public_key` (a CSR's, say) for `names`."""
        now = datetime.datetime.now(datetime.UTC)
        start = now + datetime.timedelta(days=start_days)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                   .issuer_name(self.cert.subject).public_key(public_key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days)))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in names]
                + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]), False)
        if not self.bare:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False)
        return _pem_cert(builder.sign(self.key, hashes.SHA256()))


def rsa_key(bits: int) -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def ec_key(curve: Any) -> Any:
    return ec.generate_private_key(curve)
