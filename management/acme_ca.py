"""One ACME conversation with the CA (RFC 8555), through the `acme` package.

`CA.issue(host)` orders a certificate for one name, publishes the challenge
answer (`Publish`: the issuer writes it to the store and tells the workers),
asks the CA to validate, finalizes with a fresh ECDSA P-256 key and returns
(chain PEM, key PEM). Challenges: ``http-01`` (the `acme` package's) and
``tls-alpn-01`` (RFC 8737, which the package no longer models: the key
authorization's SHA-256 goes in the critical acmeIdentifier extension of a
self-signed certificate, made here with `cryptography`).

Invariants:
* The account key is made once and kept in the store (`Acme.keep_account`):
  every issuer of the cluster, now or later, uses the same account.
* Every published challenge is withdrawn when `issue` returns or raises.
* Failures are `IssueError` with a one-line reason for the operator (the CA's
  problem detail when it gave one); no private key is ever in a reason. Whatever
  the CA answers, nothing else leaves `CA.issue` (but the issuer's
  interruptions, which are BaseExceptions).
* The CA is polled at most once every `POLL_MIN` seconds (`CA.pace` reads its
  ``Retry-After`` for the ACME client), and the wait a 429 or 503 asks for is
  kept in `IssueError.retry_after`.
* Only the ordered name is validated: an authorization for another name ends
  the issuance before anything is published.
* HTTPS to the CA goes through gevent's patched `ssl` (`adopt_patched_ssl`):
  the arbiter imports this module (and urllib3) before its children patch.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import josepy as jose
import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID, ObjectIdentifier

from management.acme_answers import (
    cap_answer,
    client_reason,
    first_line,
    problem_text,
    retry_after,
    tls_reason,
    validation_reason,
)
from management.acme_guard import IssueError

log = logging.getLogger("balancer.acme")

USER_AGENT = "balancer (acme)"
NETWORK_TIMEOUT = 30.0  # seconds per HTTP request to the CA
POLL_MIN = 1  # seconds between two polls of the CA at least, whatever its Retry-After
WAIT_MAX = 86400  # seconds: a longer Retry-After reads as this
CHALLENGE_LIFE = 600.0  # seconds a published challenge is served at most
ACME_IDENTIFIER = ObjectIdentifier("1.3.6.1.5.5.7.1.31")  # RFC 8737 §3
CHALLENGE_TYPES = ("http-01", "tls-alpn-01")

# publish(key, record) / withdraw(key): the issuer's side of a challenge
Publish = Callable[[str, dict[str, Any]], None]


def adopt_patched_ssl() -> None:
    """Make urllib3 build gevent's SSLContext. When privileges drop, the arbiter
    imports this module before (`balancer.preload`: a dropped user may not read
    the Python installation), so urllib3 bound the stdlib ``ssl.SSLContext`` before
    the management process monkey-patched `ssl`; an instance of that class
    recurses forever in its ``minimum_version`` setter once `ssl.SSLContext`
    is gevent's (gevent's "patching ssl after import" warning)."""
    import ssl

    import urllib3.util.ssl_ as urllib3_ssl

    if urllib3_ssl.SSLContext is not ssl.SSLContext:
        urllib3_ssl.SSLContext = ssl.SSLContext


def system_cas() -> str | bool:
    """The system's CA bundle (OpenSSL's default file), else True (requests' own).
    The system's is what ``[acme] ca_bundle = ""`` promises, and it stays readable
    after privileges drop, where a bundle inside the Python installation may not."""
    import ssl

    cafile = ssl.get_default_verify_paths().cafile
    return cafile if cafile and os.access(cafile, os.R_OK) else True


class EmptyResponse(jose.JSONDeSerializable):
    """The body that asks the CA to validate a challenge: ``{}`` (RFC 8555 §7.5.1)."""

    def to_partial_json(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_json(cls, jobj: Any) -> EmptyResponse:
        return cls()


class CA:
    """The configured CA (`[acme]` settings), its account in `acme_store`."""

    def __init__(self, settings: Any, acme_store: Any) -> None:
        self.settings = settings
        self.acme_store = acme_store
        self.client: client.ClientV2 | None = None
        self.asked_wait: float | None = None  # Retry-After of this issuance's 429/503

    # account ------------------------------------------------------------
    def account_key(self) -> jose.JWKRSA:
        """The cluster's account key: the stored one, or a new one stored once."""
        stored = self.acme_store.account()
        if stored is None:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            made = {"key": jose.JWKRSA(key=key).json_dumps(), "uri": ""}
            stored = self.acme_store.keep_account(made)  # a racing issuer's may win
            if stored is made or stored.get("key") == made["key"]:
                log.info("acme: made the ACME account key (kept in the store)")
        try:
            return jose.JWKRSA.json_loads(stored["key"])
        except (KeyError, TypeError, ValueError, jose.errors.DeserializationError) as exc:
            raise IssueError("the stored ACME account key cannot be read; delete the "
                             "store's ACME account to make a new one") from exc

    def connect(self) -> client.ClientV2:
        """A client registered with the CA (the account is made or found)."""
        if self.client is not None:
            return self.client
        settings = self.settings
        net = client.ClientNetwork(self.account_key(), user_agent=USER_AGENT,
                                   verify_ssl=settings.ca_bundle or system_cas(),
                                   timeout=NETWORK_TIMEOUT)
        net.session.hooks["response"].extend((cap_answer, self.pace))
        directory = client.ClientV2.get_directory(settings.directory, net)
        acme = client.ClientV2(directory, net)
        contact = {"email": settings.email} if settings.email else {}
        try:
            regr = acme.new_account(messages.NewRegistration.from_data(
                terms_of_service_agreed=True, **contact))
            uri = regr.uri
            log.info("acme: registered the account with %s", settings.directory)
        except errors.ConflictError as exc:  # the key's account exists: use it
            uri = exc.location
            net.account = messages.RegistrationResource(uri=uri, body=messages.Registration())
        if uri and (self.acme_store.account() or {}).get("uri") != uri:
            self.acme_store.set_account_uri(uri)
        self.client = acme
        return acme

    # one certificate ------------------------------------------------------
    def issue(self, host: str, kind: str, publish: Publish, withdraw: Callable[[str], None],
              spread: Callable[[], None], timeout: float) -> tuple[str, str]:
        """(chain PEM, key PEM) of a new certificate for `host`, validated by
        `kind`; `spread()` returns once every balancer can answer what was published."""
        self.asked_wait = None
        try:
            return self.converse(host, kind, publish, withdraw, spread, timeout)
        except IssueError as exc:
            wait = self.asked_wait
            if wait is None:  # (`converse` never sets `retry_after` itself)
                raise
            raise IssueError(f"{exc}; the CA asks to wait {wait} s", wait) from None

    def converse(self, host: str, kind: str, publish: Publish, withdraw: Callable[[str], None],
                 spread: Callable[[], None], timeout: float) -> tuple[str, str]:
        """`issue`, whatever goes wrong an `IssueError` with the operator's reason."""
        self.check_bundle()
        try:
            return self._issue(host, kind, publish, withdraw, spread, timeout)
        except IssueError:
            raise
        except errors.ValidationError as exc:
            raise IssueError(validation_reason(exc)) from None
        except messages.Error as exc:
            if exc.code in ("badNonce", "unauthorized", "accountDoesNotExist"):
                self.client = None  # register again next time
            raise IssueError(f"the CA refused: {problem_text(exc)}") from None
        except errors.TimeoutError:
            raise IssueError(f"the CA did not finish within {timeout:.0f}s") from None
        except requests.exceptions.SSLError as exc:
            self.client = None
            raise IssueError(f"cannot verify the CA's HTTPS certificate ({tls_reason(exc)}); "
                             f"set [acme] ca_bundle for a private CA") from None
        except (requests.exceptions.RequestException, OSError) as exc:
            self.client = None
            raise IssueError(f"cannot reach the CA at {self.settings.directory}: "
                             f"{first_line(exc)}") from None
        except errors.ClientError as exc:
            self.client = None
            raise IssueError(client_reason(exc)) from None
        except errors.Error as exc:
            self.client = None
            raise IssueError(f"ACME error: {type(exc).__name__}: {first_line(exc)}") from None
        except (jose.errors.Error, ValueError, KeyError, TypeError, AttributeError,
                IndexError) as exc:  # an answer of the wrong shape: a broken or hostile CA
            self.client = None
            raise IssueError(f"the CA's answer is not what RFC 8555 describes "
                             f"({type(exc).__name__}: {first_line(exc)})") from None
        except Exception as exc:  # the ACME client's own surprise (an OverflowError): still
            # this host's failure, backed off, not a step that fails and is redone at once
            self.client = None
            log.warning("acme: the ACME client failed unexpectedly", exc_info=True)
            raise IssueError(f"the ACME client failed ({type(exc).__name__}: "
                             f"{first_line(exc)})") from None

    def check_bundle(self) -> None:
        """IssueError naming `[acme] ca_bundle` when it cannot be read now (requests
        reads it at each new connection to the CA; it said "cannot reach the CA")."""
        path = self.settings.ca_bundle
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise IssueError(f"[acme] ca_bundle {path} cannot be read: "
                                 f"{exc.strerror or exc}") from None

    def pace(self, response: requests.Response, *args: Any, **kwargs: Any
             ) -> requests.Response:
        """A requests response hook: make the ``Retry-After`` the ACME client obeys
        whole seconds from `POLL_MIN` to `WAIT_MAX` (it polls an order again when
        the CA says: ``0`` or a date past made it ask ~200 times a second until
        the deadline; ``10**30`` overflowed its date arithmetic), and note what a
        429 or 503 asks (`asked_wait`)."""
        value = response.headers.get("Retry-After")
        if value is None:
            return response
        seconds = retry_after(value, time.time())
        wait = min(max(POLL_MIN, seconds if seconds is not None else POLL_MIN), WAIT_MAX)
        response.headers["Retry-After"] = str(wait)
        if response.status_code in (429, 503):
            self.asked_wait = wait
        return response

    def _issue(self, host: str, kind: str, publish: Publish, withdraw: Callable[[str], None],
               spread: Callable[[], None], timeout: float) -> tuple[str, str]:
        acme = self.connect()
        account = acme.net.key
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        order = acme.new_order(crypto_util.make_csr(key_pem, [host]))
        for authz in order.authorizations:
            name = authz.body.identifier.value
            if not isinstance(name, str) or name.lower().rstrip(".") != host:
                raise IssueError(f"the CA asks to validate {first_line(name)}, not {host} "
                                 f"(the only name ordered)")
        published: list[tuple[str, messages.ChallengeBody]] = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # validated recently: the CA reuses it
                challb = pick(authz, kind, host)
                name, record = challenge_record(kind, host, token_of(challb), account)
                publish(name, record)
                published.append((name, challb))
            if published:
                spread()
            for _, challb in published:
                acme.answer_challenge(challb, EmptyResponse())
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
            order = acme.poll_and_finalize(order, deadline)
        finally:
            for name, _ in published:
                withdraw(name)
        if not order.fullchain_pem:
            raise IssueError("the CA finalized the order without a certificate")
        return order.fullchain_pem, key_pem.decode()


def pick(authz: messages.AuthorizationResource, kind: str, host: str) -> messages.ChallengeBody:
    """The authorization's challenge of `kind`."""
    offered = []
    for challb in authz.body.challenges:
        typ = challb.chall.typ if not isinstance(challb.chall, challenges.UnrecognizedChallenge) \
            else challb.chall.jobj.get("type")
        if typ == kind:
            return challb
        offered.append(str(typ))
    raise IssueError(f"the CA offers no {kind} challenge for {host} "
                     f"(offered: {', '.join(offered) or 'none'}); change [acme] challenge")


def token_of(challb: messages.ChallengeBody) -> str:
    chall = challb.chall
    if isinstance(chall, challenges.UnrecognizedChallenge):
        token = chall.jobj.get("token")
    else:
        token = chall.encode("token")
    if not isinstance(token, str) or not token:
        raise IssueError("the CA's challenge has no token")
    return token


def key_authorization(token: str, account: jose.JWK) -> str:
    """token.base64url(SHA-256 thumbprint of the account key) (RFC 8555 §8.1)."""
    thumbprint = account.public_key().thumbprint(hash_function=hashes.SHA256)
    return f"{token}.{jose.b64encode(thumbprint).decode()}"


def challenge_record(kind: str, host: str, token: str,
                     account: jose.JWK) -> tuple[str, dict[str, Any]]:
    """(store key, record) of one challenge answer (`balancer.stores.acme`)."""
    answer = key_authorization(token, account)
    expires = time.time() + CHALLENGE_LIFE
    if kind == "http-01":
        return f"http-01:{token}", {"type": kind, "host": host, "token": token,
                                    "key_authorization": answer, "expires": expires}
    chain, key = alpn_certificate(host, answer)
    return f"tls-alpn-01:{host}", {"type": kind, "host": host, "chain": chain, "key": key,
                                   "expires": expires}


def alpn_certificate(host: str, answer: str) -> tuple[str, str]:
    """The self-signed TLS-ALPN-01 certificate for `host` (RFC 8737 §3): SAN `host`,
    critical acmeIdentifier = DER OCTET STRING of SHA-256(key authorization)."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(answer.encode()).digest()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER, b"\x04\x20" + digest),
                           critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode())

