"""TLS at the front door (SPEC §9): handshakes, certificates by SNI, TLS streams.

A TLS listener's connection is handshaken in its own greenlet (the accept
loop goes on), under one `client_header` deadline for the whole handshake;
then the very same request path as plain HTTP serves it
(`balancer.connection.handle_client`), through `balancer.netio.TLSIO`, which makes the
client socket a `balancer.netio.TLSStream` (reads and writes through its SSL
object, waits on its readiness, writes held for the outbox) and leaves every
other step (deadlines, relay turns, parking, and the hub's keep-alive path,
`balancer.inline`) to the worker's `IO`.

Invariants:
* Every handshake starts on one server context (`TLSFront.context`): its
  session cache and ticket keys are the worker's, so sessions resume on the
  worker that made them. The SNI callback then switches the connection to
  the context of the host's certificate: exact name, then the wildcard
  ``*.PARENT``, then ``tls.default_host``'s; none fails the handshake with
  ``unrecognized_name``.
* The certificates in force are one immutable mapping of store records,
  swapped whole (`update`), each host's context built at its first handshake
  (`balancer.tls_certs.ServedCerts`): established connections keep the context
  they were made with.
  The store is read and swapped in by one `refresh` at a time (the once-a-second
  `follow` and the control socket's ``certs`` command, which the management
  process sends after each certificate it writes), so the last read is served.
  A record that cannot be loaded (or is damaged in the store, which includes
  text no worker can serve: `balancer.certificates.unservable`) is reported
  (a record only OpenSSL refuses at its first handshake, when it was stored
  before the worker's first read) and skipped; it never takes other hosts down, and
  the host keeps the certificate served before, if any. A store whose certificates
  cannot be read as a whole (`CertsCorrupt`, `CertsLost`: a damaged or deleted
  certs file, a flushed Redis) swaps nothing: the certificates served stay.
  A worker started meanwhile gets what the store hides from the management
  process (`fill`, the control socket's ``certs-fill``), which only adds hosts
  it serves none of, and only while the store is unchanged since. A
  management process started meanwhile with no predecessor to take them from
  (restarted after its own crash) collects them from the workers (`collect`,
  ``certs-collect``): a worker hands out the records of the certificates it
  serves that the store hides, as it judges the store itself, and only while
  the store is as that management process found it.
* Outcomes are plain counters in `Stats.tls_handshakes` (no metric calls),
  one per connection that tried a handshake: a name `pick` refused is
  ``no_certificate`` only; bytes that are no TLS record are a
  ``protocol_error`` (a plain-HTTP request among them gets a 400 that says
  so, anything else is closed). An SNI name CPython cannot decode (not
  ASCII) fails the handshake before `pick` and is no log line
  (`quiet_undecodable_names`).
* A ClientHello offering ``acme-tls/1`` for a name with a pending TLS-ALPN-01
  challenge is answered with the challenge's context and closed after the
  handshake (`balancer.challenges`); while none is pending, nothing is peeked.
* Private keys reach OpenSSL through an anonymous memory file; they are never
  written to disk or logged. Each certificate served keeps the store record it
  is built from (`ServedCerts.records`), for building and `collect`: the store's
  records, in this process's memory, as the management process keeps its own.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import sys
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Final

import gevent
from gevent.lock import Semaphore

from balancer.accesslog.records import held_bytes, refused_record
from balancer.lingering import discard_waiting
from balancer.responses import local_response
from balancer.restarts import Restarts, every
from balancer.stores.base import ProblemLog, StoreError
from balancer.stores.certs import CertsCorrupt, CertsLost
from balancer.tls_certs import ServedCerts

log = logging.getLogger("balancer")

# what nginx answers by ALPN: a client offering only `http/1.0` is told so
# (HTTP/1.0 is served as it is over plain TCP); the server's preference first
ALPN: Final = ["http/1.1", "http/1.0"]
HANDSHAKE_RECORD: Final = 0x16  # the first byte of every TLS ClientHello
VERSIONS: Final = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
FOLLOW_INTERVAL: Final = 1.0  # seconds between looks at the store's certificates
PLAIN_HTTP_BODY: Final = b"400 Bad Request: plain HTTP request was sent to HTTPS port\n"


class TLSFront:
    """The server contexts of one worker and the certificates they serve."""

    def __init__(self, settings: Any, counts: dict[str, int], challenges: Any = None) -> None:
        self.settings = settings
        self.counts = counts  # outcome → handshakes (Stats.tls_handshakes)
        self.challenges = challenges  # TLS-ALPN-01 answers (`balancer.challenges`), if any
        self.context = self.new_context()
        self.context.sni_callback = self.pick_noting if settings.refuse_domain_fronting \
            else self.pick
        self.certs = ServedCerts(self.new_context)  # what is served, built by first use
        self.refreshing = Semaphore()  # one `refresh` at a time
        # TLS sockets whose SNI name `pick` refused (counted there), while they live
        self.refused: weakref.WeakSet[Any] = weakref.WeakSet()
        quiet_undecodable_names()

    def new_context(self) -> ssl.SSLContext:
        """A server context with the configured versions, ciphers and ALPN."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = VERSIONS[self.settings.min_version]
        context.maximum_version = ssl.TLSVersion.TLSv1_3
        context.set_ciphers(self.settings.ciphers)
        context.set_alpn_protocols(ALPN)
        # a client's TCP close without close_notify is its end of stream, as
        # nginx takes it (OpenSSL 3 would answer it with a decode_error alert
        # and fail the connection: a half-closed WebSocket could not be answered)
        context.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
                            | ssl.OP_IGNORE_UNEXPECTED_EOF)
        return context

    # certificates ------------------------------------------------------
    def update(self, records: Mapping[str, Mapping[str, Any]],
               damaged: Mapping[str, str] | None = None) -> None:
        """Serve exactly `records` (HOST → store record) from now on; `damaged`
        (HOST → why) names stored records that cannot be read, reported as not served."""
        self.certs.update(records, damaged or {})

    def add(self, records: Mapping[str, Mapping[str, Any]]) -> int:
        """Serve `records` too, for the hosts this worker serves no certificate of
        (those it serves are left as they are); how many were added."""
        return self.certs.add(records)

    def find(self, name: str | None) -> ssl.SSLContext | None:
        """The context for an SNI name (exact, wildcard, then default_host); a
        host's context is built at its first handshake (`ServedCerts`)."""
        context = self.certs.context
        for candidate in (name, self.settings.default_host or None):
            if not candidate:
                continue
            candidate = candidate.lower().rstrip(".")
            found = context(candidate) or context("*." + candidate.partition(".")[2])
            if found is not None:
                return found
        return None

    def pick(self, sslobj: Any, name: str | None, _context: ssl.SSLContext) -> int | None:
        """The SNI callback: switch to the host's certificate or refuse the name."""
        context = self.find(name)
        if context is None:
            self.counts["no_certificate"] += 1
            self.refused.add(sslobj)  # its failed handshake is counted here
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sslobj.context = context
        return None

    def pick_noting(self, sslobj: Any, name: str | None,
                    context: ssl.SSLContext) -> int | None:
        """`pick`, noting on the TLS socket (``sni_host``) the host whose certificate
        it got (`tls.refuse_domain_fronting`: `ClientConnection.fronting` reads it)."""
        refused = self.pick(sslobj, name, context)
        if refused is None:
            sslobj.sni_host = self.served_host(name)
        return refused

    def served_host(self, name: str | None) -> str | None:
        """The host (a key of the records) whose certificate `find` gives `name`."""
        for candidate in (name, self.settings.default_host or None):
            if candidate:
                host = self.certs.key_of(candidate.lower().rstrip("."))
                if host is not None:
                    return host
        return None

    # connections -------------------------------------------------------
    def serve(self, sock: Any, address: Any, ctx: Any,
              serve_client: Callable[[Any, Any, Any], bool]) -> bool:
        """Handshake one accepted connection, then serve it with `serve_client`;
        whether it was parked between requests (`TLSIO` parks as plain HTTP does)."""
        tls = self.handshake(sock, address, ctx)
        if tls is None:
            with contextlib.suppress(OSError):
                sock.close()
            return False
        return serve_client(tls, address, ctx)

    def handshake(self, sock: Any, address: Any, ctx: Any) -> Any:
        """The TLS socket after a finished handshake, or None (counted by outcome);
        `address` is the client's (`accept`'s)."""
        counts = self.counts
        tls = None
        try:
            with gevent.Timeout(ctx.timeouts.client_header, TimeoutError):
                first = sock.recv(1, socket.MSG_PEEK)
                if not first:
                    return None  # connected and left: no handshake was tried
                if first[0] != HANDSHAKE_RECORD:
                    counts["protocol_error"] += 1
                    if first.isupper():  # a request line's method: plain HTTP.
                        _refuse_plain(sock, address, ctx)  # Bug: any byte got this page
                    return None
                context = self.context
                challenge = self.challenges.alpn_context(sock) if self.challenges else None
                if challenge is not None:  # an ACME TLS-ALPN-01 validation (RFC 8737)
                    context = challenge
                tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                tls.do_handshake()
                if challenge is not None:
                    counts["ok"] += 1
                    tls.close()  # the validation ends with the handshake
                    return None
        except TimeoutError:
            counts["timeout"] += 1
            return None
        except ssl.SSLError:
            # Bug: a name `pick` refused was counted twice (OpenSSL's reason is
            # CALLBACK_FAILED, whose text the count looked for no name in)
            if tls is None or tls not in self.refused:
                counts["protocol_error"] += 1
            return None
        except OSError:
            counts["protocol_error"] += 1
            return None
        counts["ok"] += 1
        return tls


class _QuietNames:
    """`sys.unraisablehook` but for SNI names that are not ASCII: CPython's SNI
    callback cannot decode one (before `TLSFront.pick` is called), reports the
    UnicodeDecodeError as "unraisable" and fails the handshake, which is counted
    (`protocol_error`). Bug: each such handshake printed a traceback to the log
    (a client could fill it)."""

    def __init__(self, hook: Callable[[Any], object]) -> None:
        self.hook = hook

    def __call__(self, unraisable: Any) -> None:
        if not (isinstance(unraisable.exc_value, UnicodeDecodeError)
                and isinstance(unraisable.object, bytes)):  # the name CPython could not decode
            self.hook(unraisable)


def quiet_undecodable_names() -> None:
    """Install `_QuietNames` over the process's unraisable hook (once)."""
    if not isinstance(sys.unraisablehook, _QuietNames):
        sys.unraisablehook = _QuietNames(sys.unraisablehook)


def _refuse_plain(sock: Any, address: Any, ctx: Any) -> None:
    """Answer a plain-HTTP request on a TLS port with a 400 that says so (as nginx),
    and log it as a malformed request is (`refused_record`: none of its bytes).
    Bug: it was in no access log line."""
    request_id = ctx.request_ids.next()
    data = local_response(400, PLAIN_HTTP_BODY, b"text/plain; charset=utf-8",
                          request_id=request_id, keep_alive=False)
    sent = 0
    with contextlib.suppress(OSError):
        sock.sendall(data)
        sent = len(data)
        sock.shutdown(socket.SHUT_WR)
        discard_waiting(getattr(sock, "_sock", sock))  # its request, unread: a close would reset
    if ctx.access_log.is_enabled:
        client = address[0] if isinstance(address, tuple) else str(address)
        record = refused_record(time.time(), client, 400, sent, request_id)
        ctx.access_log.log(record, held_bytes(record))


def refresh(front: TLSFront, certs: Any) -> object:
    """Serve the store's certificates now; the store's certificate signature read
    before them (raises `StoreError` when the store cannot be read)."""
    with front.refreshing:  # a slower read never swaps in after a newer one
        signature = certs.signature()
        front.update(certs.all(), certs.damaged)
        return signature


def fill(front: TLSFront, certs: Any, signature: str,
         records: Mapping[str, Mapping[str, Any]]) -> int:
    """Serve `records`, certificates the management process last read in good
    order and the store cannot give now, for the hosts this worker serves none
    of (a worker started while the store is damaged); how many were added.
    Only while the store is still as the management process found it damaged
    (`signature`: the repr of its certificate signature then): once it changed,
    what it holds is for `follow` to read."""
    with front.refreshing:
        if repr(certs.signature()) != signature:
            return 0
        return front.add(records)


def collect(front: TLSFront, certs: Any, signature: str) -> dict[str, Mapping[str, Any]]:
    """HOST → record of the certificates this worker serves that the store hides
    now, as this worker reads it: every one while its certificates cannot be
    read as a whole, else those of its damaged records; none once the store
    is no longer as the management process that asks found it (`signature`:
    the repr of its certificate signature then). Raises `StoreError` when the
    store cannot be reached."""
    with front.refreshing:
        if repr(certs.signature()) != signature:
            return {}
        records = front.certs.records
        try:
            certs.all()
        except (CertsCorrupt, CertsLost):
            return dict(records)
        return {host: records[host] for host in certs.damaged if host in records}


def follow(front: TLSFront, certs: Any, stop: Callable[[], bool],
           interval: float = FOLLOW_INTERVAL) -> None:
    """Serve the store's certificates, and each change to them, until `stop()`:
    the safety net under the management process's direct word (`refresh`). An
    exception no branch expects is `balancer.restarts`' (bug: logged with its
    traceback every second)."""
    seen: object = object()
    problems = ProblemLog(log, quiet=True)  # the management process logs it for all

    def look() -> None:
        nonlocal seen
        try:
            if certs.signature() != seen:
                seen = refresh(front, certs)
                problems.clear("certificates: the store is readable again")
        except StoreError as exc:
            problems.report(f"certificates: {exc}")

    every(interval, look, stop, Restarts("certificates", log, quiet=False, loop="following "
                                         "the store's certificates", then="keeping those "
                                         "served and reading them again"), at_once=True)
