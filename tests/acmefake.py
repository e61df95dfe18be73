"""A scripted ACME CA (RFC 8555) on loopback for the misbehaviour pebble cannot
produce: `FakeAcme(mode)` speaks just enough of the protocol for the `acme`
client (directory, nonces, account, order, authorization, challenge, finalize,
certificate), validates every challenge without fetching it, and signs the
CSR's key with the tests' CA (`tests.test_tls.CA`), unless `mode` says
otherwise:

* ``ok``: a good certificate for the ordered name;
* ``mismatch``: a certificate for the name, but for another key;
* ``other-name``: a certificate for ``other.test`` with the CSR's key;
* ``root-first``: the good certificate with the CA's root before the leaf;
* ``not-pem``: a "certificate" that is HTML;
* ``rate-limit``: ``newOrder`` answers 429 ``rateLimited`` with ``Retry-After``;
* ``bad-nonce``: every POST answers 400 ``badNonce`` (with a fresh nonce);
* ``pending``: the authorization stays ``pending`` for ever;
* ``processing``: the order stays ``processing`` for ever, asking to poll again
  with ``Retry-After: 0`` (a client that obeys polls in a loop);
* ``huge-wait``: the same, asking ``Retry-After: 10**30``;
* ``foreign-authz``: the order's authorization is for ``victim.test``;
* ``maintenance``: the directory answers 503 (an HTML page) with
  ``Retry-After: 600``;
* ``bad-token``: the challenge's token is ``../../etc/passwd``;
* ``redirect``: the directory URL answers 301 to the real directory;
* ``redirect-loop``: the directory URL redirects to itself.

Bodies are not verified (no JWS signature checks): the client is under test.
`requests` counts every request by path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

RETRY_AFTER = 3600  # what `rate-limit` asks, in seconds


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FakeAcme:
    """The CA on 127.0.0.1 (`url` is its directory); `stop` when done."""

    def __init__(self, mode: str = "ok", tls: Path | None = None) -> None:
        """`tls`: a directory where to write the CA of its HTTPS certificate
        (`ca_bundle`); plain HTTP without."""
        self.mode = mode
        self.requests: Counter[str] = Counter()
        self.first: dict[str, float] = {}  # path → when it was first asked (monotonic)
        self.nonces = 0
        self.host = ""  # the name ordered
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.server.daemon_threads = True
        scheme = "http"
        if tls is not None:
            scheme = "https"
            self.ca_bundle = self.serve_tls(tls)
        self.base = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return self.base + ("/start" if self.mode.startswith("redirect") else "/dir")

    def serve_tls(self, directory: Path) -> Path:
        """Answer over TLS with a certificate for 127.0.0.1 from a CA of its own;
        that CA's PEM file."""
        from tests.tlsca import TestCA

        ca = TestCA("fake ACME API CA")
        chain, key = ca.issue("localhost", ips=("127.0.0.1",))
        (directory / "fake-acme.pem").write_text(chain + key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(directory / "fake-acme.pem")
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        return ca.write(directory)

    def count(self, path: str) -> None:
        self.requests[path] += 1
        self.first.setdefault(path, time.monotonic())

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        ca = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:  # newNonce
                ca.count(self.path)
                self.reply(200, b"", "text/plain")

            def do_GET(self) -> None:
                ca.count(self.path)
                if self.path == "/start":
                    target = "/start" if ca.mode == "redirect-loop" else "/dir"
                    self.reply(301, b"", "text/plain", {"Location": ca.base + target})
                elif self.path == "/dir" and ca.mode == "maintenance":
                    self.reply(503, b"<h1>Down for maintenance</h1>", "text/html",
                               {"Retry-After": "600"})
                elif self.path == "/dir":
                    self.json(200, {name: f"{ca.base}/{name}" for name in
                                    ("newNonce", "newAccount", "newOrder", "revokeCert",
                                     "keyChange")})
                else:
                    self.json(404, {"type": "urn:ietf:params:acme:error:malformed"})

            def do_POST(self) -> None:
                ca.count(self.path)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                payload = unb64(body["payload"])
                ca.post(self, self.path, json.loads(payload) if payload else None)

            def json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
                kind = "application/problem+json" if status >= 400 else "application/json"
                self.reply(status, json.dumps(obj).encode(), kind, headers)

            def reply(self, status: int, body: bytes, kind: str,
                      headers: dict[str, str] | None = None) -> None:
                ca.nonces += 1
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Replay-Nonce", b64(f"nonce{ca.nonces}".encode()))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        return Handler

    # the protocol ---------------------------------------------------------
    def post(self, peer: Any, path: str, payload: Any) -> None:
        mode, base = self.mode, self.base
        if mode == "bad-nonce":
            peer.json(400, {"type": "urn:ietf:params:acme:error:badNonce",
                            "detail": "JWS has an invalid anti-replay nonce"})
        elif path == "/newAccount":
            peer.json(201, {"status": "valid"}, {"Location": f"{base}/acct/1"})
        elif path == "/newOrder" and mode == "rate-limit":
            peer.json(429, {"type": "urn:ietf:params:acme:error:rateLimited",
                            "detail": "too many certificates already issued"},
                      {"Retry-After": str(RETRY_AFTER)})
        elif path == "/newOrder":
            self.host = payload["identifiers"][0]["value"]
            peer.json(201, self.order("pending"), {"Location": f"{base}/order/1"})
        elif path == "/authz/1":
            peer.json(200, self.authz())
        elif path == "/chall/1":
            peer.json(200, self.challenge("processing"),
                      {"Link": f'<{base}/authz/1>;rel="up"'})
        elif path == "/finalize/1":
            self.csr = x509.load_der_x509_csr(unb64(payload["csr"]))
            peer.json(200, self.order("processing"), {"Location": f"{base}/order/1"})
        elif path == "/order/1" and mode in ("processing", "huge-wait"):
            wait = "0" if mode == "processing" else "1" + "0" * 30
            peer.json(200, self.order("processing"), {"Retry-After": wait})
        elif path == "/order/1":
            peer.json(200, self.order("valid"))
        elif path == "/cert/1":
            kind = "text/html" if mode == "not-pem" else "application/pem-certificate-chain"
            peer.reply(200, self.chain(), kind)
        else:
            peer.json(404, {"type": "urn:ietf:params:acme:error:malformed", "detail": path})

    def order(self, status: str) -> dict[str, Any]:
        made = {"status": status, "identifiers": [{"type": "dns", "value": self.host}],
                "authorizations": [f"{self.base}/authz/1"],
                "finalize": f"{self.base}/finalize/1"}
        if status == "valid":
            made["certificate"] = f"{self.base}/cert/1"
        return made

    def authz(self) -> dict[str, Any]:
        answered = self.requests["/chall/1"] > 0 and self.mode != "pending"
        name = "victim.test" if self.mode == "foreign-authz" else self.host
        return {"status": "valid" if answered else "pending",
                "identifier": {"type": "dns", "value": name},
                "challenges": [self.challenge("valid" if answered else "pending")]}

    def challenge(self, status: str) -> dict[str, Any]:
        return {"type": "http-01", "url": f"{self.base}/chall/1", "status": status,
                "token": "../../etc/passwd" if self.mode == "bad-token"
                else b64(hashlib.sha256(self.mode.encode()).digest())}

    def chain(self) -> bytes:
        from tests.test_tls import CA

        if self.mode == "not-pem":
            return b"<html><body>Certificate ready!</body></html>"
        key = ec.generate_private_key(ec.SECP256R1()).public_key() if self.mode == "mismatch" \
            else self.csr.public_key()
        leaf = CA.certify(key, "other.test" if self.mode == "other-name" else self.host)
        return (CA.pem + leaf if self.mode == "root-first" else leaf + CA.pem).encode()
