"""The certificates one worker serves by SNI (SPEC §9), each host's context
built at its first handshake.

A server context per certificate costs ~3 ms to build (OpenSSL 3: ~0.5 ms
`SSL_CTX_new`, ~2.4 ms `load_cert_chain`) and ~15 KiB: built for every stored
certificate at a worker's start, 5,000 certificates held a worker 17 s (of
CPU, each worker) before its first handshake. So a worker keeps the store's
records and builds a host's context when a handshake first names it.

Invariants:
* `records` (HOST → store record) is what this worker serves, swapped whole
  (`update`, `add`); `contexts` (HOST → context) holds the contexts built, each
  of its host's record in `records`, at most `kept` of them, in the order of
  their last handshake: beyond, the one unused longest goes (it is built again
  at its host's next handshake). Bug: the oldest built went, so with more stored
  certificates than that a client naming thousands of hosts in turn made the
  busiest hosts' next handshakes build again (~3 ms each).
* The first `update` (the worker's start) builds nothing: a host's context is
  built at its first handshake. A handshake for a host already built costs a
  dict lookup and a `move_to_end` (~0.25 µs more than the lookup alone, of a
  full handshake's ~300 µs). A name no record covers builds nothing and keeps nothing.
* Later updates build each new or changed record at once (the loop polls
  between two, `turn`), as before: one OpenSSL refuses is logged then, and its
  host keeps the record (and context) served before, if any. A changed host's
  context pushed out between two builds and built again at a handshake (of the
  record served until the swap) is dropped at the swap (`forget_stale`).
* A record OpenSSL refuses is tried once while it is the same (`failed`) and
  logged once (`problems`); the SNI order then goes on (the wildcard,
  ``tls.default_host``, ``unrecognized_name``).
* `epoch` is replaced whenever what `key_of` answers may change (`records` or
  `failed`): a TLS connection judges a Host again then
  (`balancer.connection.ClientConnection.fronting`).
"""

from __future__ import annotations

import logging
import ssl
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Final

from balancer.certificates import PROCESS_ERRORS, check_size, load_pem, refusal
from balancer.table import host_name
from balancer.turns import turn

log = logging.getLogger("balancer")

CONTEXTS_KEPT: Final = 10_000  # contexts a worker keeps built (~15 KiB each): `ServedCerts.kept`
Record = Mapping[str, Any]
# a build's errors that are the worker's, not its record's: tried again (`build`)
WORKERS_ERRORS: Final = PROCESS_ERRORS


class ServedCerts:
    """HOST → record of the certificates served, and the contexts built of them."""

    def __init__(self, new_context: Callable[[], ssl.SSLContext],
                 kept: int = CONTEXTS_KEPT) -> None:
        self.new_context = new_context  # a server context, settings applied
        self.kept = kept  # contexts kept built at most (the least recently used go)
        self.records: Mapping[str, Record] = {}
        # HOST → its context, the least recently handshaken first
        self.contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self.failed: dict[str, Record] = {}  # HOST → its record OpenSSL refused
        self.problems: dict[str, str] = {}  # HOST → why its stored certificate is not served
        self.epoch = object()  # replaced when `key_of` may answer otherwise (`changed`)
        self.started = False  # an update was made (the first builds nothing)

    # lookups (the SNI callback) -------------------------------------------
    def context(self, host: str) -> ssl.SSLContext | None:
        """The context serving `host`, built if need be (`host` a key of `records`),
        now the most recently used; None when none can be (each reason logged once)."""
        contexts = self.contexts
        context = contexts.get(host)
        if context is not None:
            contexts.move_to_end(host)
            return context
        return self.build(host) if host in self.records else None

    def key_of(self, name: str) -> str | None:
        """The host (a key of `records`) whose certificate a normalised name gets:
        its own, else its parent's wildcard; None without either. A record OpenSSL
        refused (`failed`) is none, as at the handshake (`TLSFront.find`). Bug: a
        name whose record was refused, served `tls.default_host`'s certificate,
        was taken for its own: the default host's requests got a 421."""
        records, failed = self.records, self.failed
        for key in (name, "*." + name.partition(".")[2]):
            record = records.get(key)
            if record is not None and failed.get(key) is not record:
                return key
        return None

    def matches_sni(self, sni_host: str | None, host: bytes) -> bool:
        """Whether a request for the Host value `host` may go on a TLS connection
        whose certificate is `sni_host`'s: the Host's certificate is that one
        (`tls.refuse_domain_fronting`; `balancer.connection.ClientConnection.fronting`)."""
        return sni_host is not None and self.key_of(host_name(host).decode("latin-1")) == sni_host

    def build(self, host: str) -> ssl.SSLContext | None:
        """Build (and keep) the context of `host`'s record (None: OpenSSL refuses
        it, logged once). One that cannot be built for want of descriptors or
        memory (`OSError`: the worker's, not the record's) is tried again at the
        next handshake (`WORKERS_ERRORS`). Bug: it was taken for a record OpenSSL refuses, and a
        worker at its descriptor limit (a flood of connections) served its host
        no more until the record changed."""
        record = self.records[host]
        if self.failed.get(host) is record:
            return None
        try:
            context = self.load(record)
        except (ssl.SSLError, OSError, ValueError) as exc:
            if _refused(exc):
                self.failed[host] = record
                self.changed()
            reason = refusal(exc)
            if self.problems.get(host) != reason:
                self.problems[host] = reason
                log.error("certificate of %s not served: %s", host, reason)
            return None
        return self.keep(host, context)

    def keep(self, host: str, context: ssl.SSLContext) -> ssl.SSLContext:
        """Keep `host`'s context (of its record in `records`), the one unused
        longest going first beyond `kept`."""
        contexts = self.contexts
        if len(contexts) >= self.kept:
            contexts.popitem(last=False)
        contexts[host] = context
        return context

    def load(self, record: Record) -> ssl.SSLContext:
        """A context serving one record (PEM chain and key, via a memory file)."""
        chain = str(record.get("chain", ""))
        check_size(chain)
        context = self.new_context()
        load_pem(context, chain, str(record.get("key", "")))
        return context

    # changes ----------------------------------------------------------------
    def update(self, records: Mapping[str, Record], damaged: Mapping[str, str]) -> None:
        """Serve exactly `records` from now on; `damaged` (HOST → why) names stored
        records that cannot be read: what was served of them stays. The first
        update builds nothing; later ones build what changed at once."""
        old = self.records
        served: dict[str, Record] = {h: old[h] for h in damaged if h in old}
        problems = {h: why for h, why in self.problems.items() if h in records}
        built: dict[str, weakref.ref[ssl.SSLContext]] = {}  # (not kept alive: pushed out, freed)
        for host, record in records.items():
            known = old.get(host)
            if known is not None and known == record:
                served[host] = known  # the same object: `failed` holds by it
            elif not self.started:
                served[host] = record
            else:
                served[host] = self.rebuild(host, record, known, problems, built)
        self.forget_stale(served, old, built)
        self.swap(served, problems, damaged)
        self.started = True

    def rebuild(self, host: str, record: Record, known: Record | None,
                problems: dict[str, str],
                built: dict[str, weakref.ref[ssl.SSLContext]]) -> Record:
        """The record served from now on for a host whose stored record is new or
        changed: built now (the record it had before, if any, when OpenSSL refuses
        it), its context noted in `built`."""
        turn()  # many changes: the loop polls (handshakes, requests) between them
        try:
            context = self.load(record)
        except (ssl.SSLError, OSError, ValueError) as exc:
            problems[host] = refusal(exc)
            if known is None:
                if _refused(exc):  # (else built again at its first handshake, `build`)
                    self.failed[host] = record
                return record
            return known
        self.contexts.pop(host, None)  # (re-inserted: the newest)
        built[host] = weakref.ref(self.keep(host, context))
        problems.pop(host, None)
        return record

    def forget_stale(self, served: Mapping[str, Record], old: Mapping[str, Record],
                     built: Mapping[str, weakref.ref[ssl.SSLContext]]) -> None:
        """Drop the context of each host whose record changed that is not the one
        `rebuild` built: pushed out meanwhile (handshakes between two builds) and
        built again at a handshake, it is of the record served until now. Bug: that
        host went on serving its replaced certificate. (`built` holds weak references:
        a mass change, a restore of 20,000 records, would otherwise hold every
        context built until the update ends, ~15 KiB each.)"""
        contexts = self.contexts
        for host, record in served.items():
            ref = built.get(host)
            if record is not old.get(host) and contexts.get(host) is not (ref and ref()):
                contexts.pop(host, None)

    def swap(self, records: dict[str, Record], problems: dict[str, str],
             damaged: Mapping[str, str]) -> None:
        """Serve `records` from now on; log what is newly not served or served again."""
        for host, reason in problems.items():
            if self.problems.get(host) != reason and host not in damaged:
                log.error("certificate of %s not served: %s%s", host, reason,
                          "; keeping the one loaded before" if host in self.records else "")
        for host in self.problems.keys() - problems.keys():
            if host in records and host not in damaged:
                log.info("certificate of %s is served again", host)
        for host, reason in damaged.items():
            if self.problems.get(host) != reason:  # the management process logs it once
                log.debug("certificate of %s: %s", host, reason)
        problems.update(damaged)
        self.records, self.problems = records, problems
        self.failed = {h: r for h, r in self.failed.items() if records.get(h) is r}
        for host in [h for h in self.contexts if h not in records]:
            del self.contexts[host]
        self.changed()

    def add(self, records: Mapping[str, Record]) -> int:
        """Serve `records` too, for the hosts not served (others are left as they
        are); how many were added."""
        added = {h: r for h, r in records.items() if h not in self.records}
        if added:
            self.records = {**self.records, **added}
            self.problems = {h: why for h, why in self.problems.items() if h not in added}
            self.changed()
        return len(added)

    def changed(self) -> None:
        """`records` or `failed` changed: the Hosts TLS connections found to match
        their certificates are judged again at their next request (`epoch`)."""
        self.epoch = object()


def _refused(exc: BaseException) -> bool:
    """Whether a record's build failed for the record (OpenSSL refused it, or its
    text), not for the worker (no descriptor or memory for its memory file)."""
    return isinstance(exc, ssl.SSLError) or not isinstance(exc, OSError) or \
        exc.errno not in WORKERS_ERRORS


