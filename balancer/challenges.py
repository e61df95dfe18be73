"""ACME challenge answers, as every worker serves them (SPEC §9, docs/tls.md).

The management process's issuer publishes challenges in the store
(`balancer.stores.acme`); each worker follows them (`follow`, once a second,
and at once on the control socket's ``challenges`` command) into one
`Challenges` per worker:

* HTTP-01: ``GET /.well-known/acme-challenge/TOKEN`` on any listener, with the
  ``Host`` the challenge is for, is answered 200 with the key authorization,
  before the rule's action (`answer`), as Traefik and Caddy do. A token that
  is not published, or asked for under another name, goes to the rule as
  usual (an app behind the balancer may answer its own challenges).
* TLS-ALPN-01 (RFC 8737): a ClientHello that offers the ALPN protocol
  ``acme-tls/1`` for a name with a published challenge gets that challenge's
  self-signed certificate, and the connection ends after the handshake
  (`balancer.tls.TLSFront.handshake` asks `alpn_context`). Any other
  ClientHello for the name gets its usual certificate.

Invariants:
* Requests pay nothing unless their target starts with `ACME_PATH`; TLS
  handshakes pay nothing while no TLS-ALPN-01 challenge is published (then a
  peek at the ClientHello, bounded in bytes and time).
* `tokens` and `alpn` are swapped whole by `update`: a request reads one or
  the other, never a half-made mapping. Expired records are not served.
* Parsing a ClientHello never raises: anything malformed is "not a challenge".
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import gevent

from balancer.restarts import Restarts, every
from balancer.stores.base import ProblemLog, StoreError
from balancer.table import host_name

log = logging.getLogger("balancer")

ACME_PATH: Final = b"/.well-known/acme-challenge/"
ALPN_PROTOCOL: Final = "acme-tls/1"
TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,256}")  # base64url, as CAs make them
FOLLOW_INTERVAL: Final = 1.0  # seconds between looks at the store's challenges
REFRESH_EVERY: Final = 30  # looks between re-reads anyway (drops expired records)
MAX_RECORD: Final = 16384 + 5  # one TLS record: where a ClientHello must fit
PEEK_WAIT: Final = 0.005  # seconds between peeks at a ClientHello still arriving
PEEK_TRIES: Final = 400  # ... at most 2 s (the handshake's own deadline bounds it too)


class Challenges:
    """The challenge answers one worker serves (see the module doc)."""

    def __init__(self) -> None:
        # HTTP-01: token → (the host it is for, as `host_name` writes it; key authorization)
        self.tokens: dict[bytes, tuple[bytes, bytes]] = {}
        self.alpn: dict[str, ssl.SSLContext] = {}  # TLS-ALPN-01: host → its context
        self.loaded: dict[str, tuple[str, ssl.SSLContext]] = {}  # host → (digest, context)

    def update(self, records: Mapping[str, Mapping[str, Any]], now: float | None = None) -> None:
        """Serve exactly the unexpired `records` (KEY → store record) from now on."""
        now = time.time() if now is None else now
        tokens: dict[bytes, tuple[bytes, bytes]] = {}
        loaded: dict[str, tuple[str, ssl.SSLContext]] = {}
        for record in records.values():
            expires = record.get("expires")
            if not isinstance(expires, (int, float)) or expires <= now:
                continue
            kind = record.get("type")
            if kind == "http-01":
                token, answer = record.get("token"), record.get("key_authorization")
                host = record.get("host")
                if isinstance(token, str) and TOKEN_RE.fullmatch(token) \
                        and isinstance(answer, str) and answer.isascii() \
                        and isinstance(host, str) and host.isascii():
                    tokens[token.encode()] = (host_name(host.encode()), answer.encode())
            elif kind == "tls-alpn-01":
                self._load_alpn(record, loaded)
        self.tokens = tokens
        self.loaded = loaded
        self.alpn = {host: context for host, (_, context) in loaded.items()}

    def _load_alpn(self, record: Mapping[str, Any],
                   loaded: dict[str, tuple[str, ssl.SSLContext]]) -> None:
        host, chain, key = record.get("host"), record.get("chain"), record.get("key")
        if not (isinstance(host, str) and isinstance(chain, str) and isinstance(key, str)):
            return
        host = host.lower()
        try:  # (bug: a text that is no UTF-8, a lone surrogate, raised out of `update`
            # here: every challenge of the store unserved while the record stayed)
            digest = hashlib.sha256(f"{chain}\0{key}".encode()).hexdigest()
            known = self.loaded.get(host)
            if known is not None and known[0] == digest:
                loaded[host] = known
                return
            loaded[host] = (digest, alpn_context(chain, key))
        except (ssl.SSLError, OSError, ValueError) as exc:
            log.error("acme: the TLS-ALPN-01 certificate of %s cannot be loaded: %s",
                      host, type(exc).__name__)

    def answer(self, ex: Any) -> bool:
        """Answer an HTTP-01 validation request; False when `ex` is not one (its
        target starts with `ACME_PATH`: the caller checked): not a GET or HEAD, a
        token not published, or a Host other than the challenge's."""
        head = ex.head
        if head.method != b"GET" and head.method != b"HEAD":
            return False
        found = self.tokens.get(head.target[len(ACME_PATH):])
        if found is None or host_name(head.host) != found[0]:
            return False
        ex.respond(200, found[1], b"application/octet-stream")
        return True

    def alpn_context(self, sock: socket.socket) -> ssl.SSLContext | None:
        """The TLS-ALPN-01 context to answer this connection with, or None (any
        other client). Peeks at the ClientHello; reads nothing."""
        alpn = self.alpn
        if not alpn:
            return None
        offer = peek_hello(sock)
        if offer is None:
            return None
        name, protocols = offer
        if ALPN_PROTOCOL not in protocols or name is None:
            return None
        return alpn.get(name.lower().rstrip("."))


def alpn_context(chain: str, key: str) -> ssl.SSLContext:
    """A server context that serves one TLS-ALPN-01 certificate and speaks only
    ``acme-tls/1`` (no SNI callback: it is chosen before the handshake)."""
    from balancer.certificates import load_pem

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([ALPN_PROTOCOL])
    load_pem(context, chain, key)
    return context


def peek_hello(sock: socket.socket) -> tuple[str | None, list[str]] | None:
    """(SNI name, ALPN protocols) of the ClientHello waiting on `sock`, or None when
    it is not a whole ClientHello within one record (bounded: `PEEK_TRIES`)."""
    for _ in range(PEEK_TRIES):
        try:
            data = sock.recv(MAX_RECORD, socket.MSG_PEEK)
        except OSError:
            return None
        if not data:
            return None  # the client left
        parsed = parse_hello(data)
        if parsed is not NEED_MORE:
            return parsed  # type: ignore[return-value]
        gevent.sleep(PEEK_WAIT)  # the rest of the record is on its way
    return None


NEED_MORE: Final = object()


def parse_hello(data: bytes) -> object:
    """(SNI name, ALPN protocols) of a TLS record holding a whole ClientHello;
    `NEED_MORE` when the record is incomplete; None when it is not one."""
    if len(data) < 5:
        return NEED_MORE if data[:1] in (b"", b"\x16") else None
    if data[0] != 0x16:
        return None
    end = 5 + int.from_bytes(data[3:5], "big")
    if len(data) < end:
        return NEED_MORE if end <= MAX_RECORD else None
    with contextlib.suppress(IndexError, ValueError, UnicodeDecodeError):
        return _hello_fields(data[5:end])
    return None


def _hello_fields(body: bytes) -> tuple[str | None, list[str]] | None:
    """Walk a ClientHello handshake message (RFC 8446 §4.1.2) to its extensions."""
    if body[0] != 1 or 4 + int.from_bytes(body[1:4], "big") > len(body):
        return None  # not a ClientHello, or one longer than its record
    at = 4 + 2 + 32  # handshake header, legacy_version, random
    at += 1 + body[at]  # legacy_session_id
    at += 2 + int.from_bytes(body[at:at + 2], "big")  # cipher_suites
    at += 1 + body[at]  # legacy_compression_methods
    end = at + 2 + int.from_bytes(body[at:at + 2], "big")
    at += 2
    name: str | None = None
    protocols: list[str] = []
    while at + 4 <= end:
        kind = int.from_bytes(body[at:at + 2], "big")
        size = int.from_bytes(body[at + 2:at + 4], "big")
        value = body[at + 4:at + 4 + size]
        if kind == 0:  # server_name: list length, type 0, name length, name
            name = value[5:5 + int.from_bytes(value[3:5], "big")].decode("ascii")
        elif kind == 16:  # ALPN: list length, then length-prefixed names
            protocols = _alpn_names(value[2:])
        at += 4 + size
    return name, protocols


def _alpn_names(data: bytes) -> list[str]:
    names, at = [], 0
    while at < len(data):
        size = data[at]
        names.append(data[at + 1:at + 1 + size].decode("ascii", "replace"))
        at += 1 + size
    return names


def follow(challenges: Challenges, acme: Any, stop: Callable[[], bool],
           interval: float = FOLLOW_INTERVAL) -> None:
    """Serve the store's challenges, and each change to them, until `stop()`. A
    store that cannot be read keeps those served (the management process reports
    it); anything else is `balancer.restarts`' (bug: swallowed, every look)."""
    seen: object = object()
    looks = 0
    problems = ProblemLog(log, quiet=True)

    def look() -> None:
        nonlocal seen, looks
        try:
            signature = acme.challenges_signature()
            looks += 1
            if signature != seen or looks % REFRESH_EVERY == 0:
                challenges.update(acme.challenges())
                seen = signature
        except StoreError as exc:
            problems.report(f"acme: the challenges cannot be read: {exc}")
            return
        problems.clear("acme: the store's challenges are readable again")

    every(interval, look, stop, Restarts("acme", log, quiet=False, loop="following the "
                                         "store's challenges", then="serving those read "
                                         "before and reading them again"), at_once=True)
