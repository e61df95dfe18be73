"""TLS toward `https://` backends: the client contexts, the name verified, the handshake.

A backend written ``https://host:port`` is reached over TLS. Its certificate
is verified by default, against the system's CAs or `tls.backend_ca_bundle`
(which then replaces them), and must name the host the request was for: the
request's Host (port stripped), which is also the SNI name sent. That is
the name in the rule's key for an exact rule, and the name the client asked
for under a wildcard or catch-all rule. The backend's own address, an IP or
a DNS name, is only where the connection goes (as HAProxy's ``verify
required`` with ``sni req.hdr(host)``): the certificate an app serves names
the app. A rule with ``"backend_tls_verify": false`` verifies nothing (and
still sends SNI).

Invariants:
* One `BackendTLS` per worker, its contexts made once, when the first
  https:// backend connects. The CA bundle's text is read when the worker
  starts (settings do not change after the start: a bundle deleted, cut or
  replaced later changes nothing), parsed into the context then; a bundle the
  worker cannot read or OpenSSL cannot load fails every verified connection
  with the reason, naming the file, never the backend.
* A TLS connection is pooled under its pool key (`pool_key`): the name it
  was verified for, or ``!NAME`` when unverified; a pooled connection is
  only ever handed to a request of the same key, so a connection made (and
  verified) for one host never carries another host's request. The TLS
  session a backend gave is kept per backend and pool key too, and the next
  connection of that key resumes it (as nginx's ``proxy_ssl_session_reuse``
  and HAProxy do by default): a session verified for one name is never
  offered for another.
* Verification is the same on every Python version: OpenSSL's chain checks
  as HAProxy and nginx make them. Python 3.13's `create_default_context` adds
  ``VERIFY_X509_STRICT`` (refusing, say, a private CA's certificate without an
  Authority Key Identifier, which 3.11 and 3.12 accept) and
  ``VERIFY_X509_PARTIAL_CHAIN`` (an intermediate in the bundle as a trust
  anchor): both are cleared (`VERSION_FLAGS`), so upgrading Python never turns
  a working backend into a 502.
* A backend never renegotiates: a TLS 1.2 HelloRequest is answered with the
  ``no_renegotiation`` alert (as nginx and HAProxy, which set
  ``SSL_OP_NO_RENEGOTIATION`` on their backend connections too), and the
  connection ends there: the HelloRequest, seen by the message callback of a
  TLS 1.2 connection's context (`_watch`), shuts the socket's reading, so the
  read under way ends at once with `RenegotiationRefused` (`TLSStream.ended`;
  the relay's `BackendClosed`: 502, never pooled),
  whether the backend honours the refusal or not. Bug: one that ignored it
  (waiting for a ClientHello, or asking again) held the request until
  `timeouts.backend_read` (504). A connection that renegotiated could present
  another certificate than the one verified (and would cost a handshake per
  request).
* The message callback costs a Python call per TLS record, so only TLS 1.2
  connections have it (TLS 1.3 has no renegotiation): each verify mode has
  a pair of contexts, `quiet` and `watched`, and a connection is moved to the
  one its version needs when its handshake ends (`secure`). A session is
  bound to the context of the connection it was taken from (the ssl module
  resumes it only there), so a session is kept with its context
  (`keepable`) and resumed in it.
* Every TLS failure of the handshake becomes `BackendTLSError` (a `ConnectError`: nothing was
  sent, so it is retried on another backend and counts as a connect failure),
  its message saying what failed, for the operator log. The handshake is
  bounded by `timeouts.backend_connect`, from the start of the connect; the
  watchdog's `Overdue` (the client connection's deadline passed first) is no
  TLS failure: `Backend.connect_tls` makes it a `ConnectOverdue`.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from typing import Any, Final, NamedTuple

from balancer.errors import BackendTLSError, Overdue
from balancer.netio import REFUSED

ALPN: Final = ["http/1.1"]
UNVERIFIED: Final = "!"  # prefix of the pool key of an unverified connection
# what Python 3.13's create_default_context adds to the verify flags (module docstring)
VERSION_FLAGS: Final = ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
HANDSHAKE: Final = 22  # a TLS record's content type
HELLO_REQUEST: Final = 0  # a handshake message's type: a TLS 1.2 server asks to renegotiate


class Contexts(NamedTuple):
    """The client contexts of one verify mode (module doc)."""

    quiet: ssl.SSLContext  # TLS 1.3 connections, and every handshake without a session
    watched: ssl.SSLContext  # TLS 1.2 connections: `_watch` sees each TLS message


def request_name(host: bytes) -> str:
    """The name a request's Host field (any case, port allowed) names; "" for none."""
    host = host.strip().lower()
    if host.startswith(b"["):  # an IPv6 literal: no SNI, verified as an IP address
        end = host.find(b"]")
        host = host[1:end] if end > 0 else host
    else:
        host = host.rpartition(b":")[0] if b":" in host else host
    return host.rstrip(b".").replace(b"\0", b"").decode("ascii", "replace")


def pool_key(host: bytes, verify: bool) -> str:
    """The pool a TLS connection for a request with Host `host` belongs to."""
    name = request_name(host)
    return name if verify else UNVERIFIED + name


class BackendTLS:
    """The worker's client contexts for https:// backends."""

    def __init__(self, ca_bundle: str = "") -> None:
        self.ca_bundle = ca_bundle
        self.cas, self.cas_problem = read_bundle(ca_bundle)
        self.verified: Contexts | None = None  # made on first use
        self.unverified: Contexts | None = None

    def context(self, verify: bool) -> ssl.SSLContext:
        """The context verifying certificates and names, or the one that does not
        (BackendTLSError when the CA bundle cannot be loaded)."""
        return self.contexts(verify).quiet

    def contexts(self, verify: bool) -> Contexts:
        """The pair of contexts of a verify mode (as `context`)."""
        if verify:
            if self.verified is None:
                if self.cas_problem:
                    raise BackendTLSError(self.cas_problem)
                try:
                    self.verified = Contexts(_client_context(self.cas),
                                             _watched(_client_context(self.cas)))
                except (ssl.SSLError, ValueError) as exc:
                    self.cas_problem = (f"TLS: tls.backend_ca_bundle {self.ca_bundle}: OpenSSL "
                                        f"cannot load it ({getattr(exc, 'reason', None) or exc})")
                    raise BackendTLSError(self.cas_problem) from None
            return self.verified
        if self.unverified is None:
            self.unverified = Contexts(_unverified(_client_context(None)),
                                       _watched(_unverified(_client_context(None))))
        return self.unverified

    def secure(self, sock: socket.socket, key: str, where: str, deadline: float,
               bounded: Any, session: Any = None) -> Any:
        """The TLS socket over connected `sock` for pool `key`, handshaken by
        `deadline` (monotonic; `bounded(seconds)` bounds the whole handshake),
        resuming `session` if the backend still knows it; closes `sock` and
        raises BackendTLSError on any failure but the watchdog's `Overdue`, raised
        as is (the client connection's deadline passed: `Backend.connect_tls`).
        `session`: what `keepable` gave of an earlier connection of `key`."""
        verify = not key.startswith(UNVERIFIED)
        name = key if verify else key[len(UNVERIFIED):]
        try:
            if verify and not name:
                raise BackendTLSError(f"{where}: TLS: the request has no Host to verify "
                                      f"the certificate against")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendTLSError(f"{where}: TLS handshake timed out")
            sock.settimeout(remaining)
            try:
                contexts = self.contexts(verify)
            except BackendTLSError as exc:
                raise BackendTLSError(f"{where}: {exc}") from None
            # a session is resumed in the context it was taken in (`keepable`)
            context, resumed = session if session is not None else (contexts.quiet, None)
            tls = context.wrap_socket(sock, server_hostname=name or None,
                                      do_handshake_on_connect=False, session=resumed)
            try:
                with bounded(remaining):
                    tls.do_handshake()
                wanted = contexts.watched if tls.version() == "TLSv1.2" else contexts.quiet
                if tls.context is not wanted:
                    tls.context = wanted
            except BaseException:
                # `tls` took `sock`'s descriptor over (closing `sock` closes nothing).
                # Bug: it stayed open for as long as the error was kept (the backend's
                # `last_error`, the failure report's last), its frame with it
                tls.close()
                raise
        except BackendTLSError:
            sock.close()
            raise
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise BackendTLSError(f"{where}: TLS: certificate not trusted for {name!r}: "
                                  f"{exc.verify_message or exc.reason}") from None
        except Overdue:  # the watchdog's, not the handshake's: the caller's to map
            sock.close()
            raise
        except TimeoutError:
            sock.close()
            raise BackendTLSError(f"{where}: TLS handshake timed out") from None
        except ssl.SSLError as exc:
            sock.close()
            message = str(exc) if "timed out" in str(exc) else (exc.reason or str(exc))
            raise BackendTLSError(f"{where}: TLS handshake failed: {message}") from None
        except (OSError, ValueError) as exc:
            sock.close()
            raise BackendTLSError(f"{where}: TLS handshake failed: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from None
        return tls


def read_bundle(path: str) -> tuple[str | None, str]:
    """(the PEM text of the CA bundle at `path`, "") or (None, why it cannot be
    read); (None, "") when no bundle is set (the system's CAs)."""
    if not path:
        return None, ""
    try:
        with open(path, "rb") as f:
            return f.read().decode("ascii"), ""
    except (OSError, UnicodeDecodeError) as exc:
        return None, (f"TLS: tls.backend_ca_bundle {path} cannot be read: "
                      f"{getattr(exc, 'strerror', None) or 'not PEM text'}")


def keepable(tls: Any) -> tuple[ssl.SSLContext, Any] | None:
    """What of connection `tls` the next connection of its pool resumes (`secure`):
    its session with its context, or None when it has none."""
    session = tls.session
    return None if session is None else (tls.context, session)


def read_failure(exc: OSError) -> str:
    """Why a read from (or write to) a backend failed, for `BackendClosed`: an
    SSLError in words; anything else as is."""
    reason = getattr(exc, "reason", None)  # (an SSLError made in Python has none)
    if not isinstance(exc, ssl.SSLError) or not reason:
        return str(exc)
    return f"TLS: {reason.lower().replace('_', ' ')}"


def _watch(conn: Any, direction: str, _version: int, content_type: int, msg_type: int,
           _data: bytes) -> None:
    """The message callback of a `watched` context (OpenSSL calls it for each TLS
    record and message a connection reads or writes, `conn` the owner of its SSL
    object): a HelloRequest read is the backend asking for a renegotiation.
    OpenSSL answers it with the no_renegotiation alert; the connection's
    reading is shut here and the connection noted (`netio.REFUSED`), so the
    read goes on to the end of the stream at once, which raises
    `RenegotiationRefused` (`TLSStream.ended`). Nothing is raised here: the ssl
    module would keep it for a later call when the read ends the stream."""
    if content_type == HANDSHAKE and msg_type == HELLO_REQUEST and direction == "read":
        REFUSED.add(conn)
        # (a duplicate: `conn`, the ssl module's socket or gevent's stand-in,
        # may be one whose shutdown is a TLS one)
        with contextlib.suppress(OSError), \
                socket.fromfd(conn.fileno(), conn.family, socket.SOCK_STREAM) as dup:
            dup.shutdown(socket.SHUT_RD)


def _watched(context: ssl.SSLContext) -> ssl.SSLContext:
    """`context` with `_watch` as its message callback, set on the C type: the
    ssl module's property would wrap it in three enum conversions per call."""
    ssl_base: Any = ssl._ssl._SSLContext  # type: ignore[attr-defined]
    ssl_base._msg_callback.__set__(context, _watch)
    return context


def _unverified(context: ssl.SSLContext) -> ssl.SSLContext:
    """`context` verifying nothing (a rule's ``"backend_tls_verify": false``)."""
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _client_context(cas: str | None) -> ssl.SSLContext:
    """A client context: TLS 1.2 or newer, HTTP/1.1 by ALPN, the CAs of the PEM
    text `cas` (or the system's)."""
    context = ssl.create_default_context(cadata=cas)
    context.verify_flags &= ~VERSION_FLAGS  # as on Python 3.11 and 3.12
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(ALPN)
    # a backend's TCP close without close_notify ends its stream (HTTP framing
    # tells a cut response; a close-delimited body ends there, as over plain TCP);
    # a TLS 1.2 backend's renegotiation (HelloRequest) is refused with the
    # no_renegotiation alert, as nginx and HAProxy refuse it (`_watch`)
    context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF | ssl.OP_NO_RENEGOTIATION
    return context
