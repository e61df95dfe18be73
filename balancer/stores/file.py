"""The file store: the whole table in one JSON file on one machine (SPEC §6).

Invariants:
* The file is ``{"version": N, "hosts": {...}}`` and is only ever replaced
  whole: a temp file in the same directory is written, fsynced and renamed
  over it, then the directory is fsynced. Readers see the old or the new
  table, never a mix.
* Writers hold an exclusive `flock` on the sidecar ``PATH.lock`` from the
  read to the rename, so concurrent writers (any number of processes) never
  lose an update. ``PATH`` is the real path, symlinks resolved at each lock:
  writers reaching one file through different links share its lock. The
  lock is polled, never blocked on, so a gevent worker keeps serving while
  it waits.
* `watch` (`balancer.stores.file_watch`) re-reads the file when its (inode,
  size, mtime, ctime) changes; a corrupt file keeps the last good table.
* The file is parsed once per content, whoever asks, and in
  `balancer.big_loads.loading` (no garbage collection walks what a big one
  makes, in a proxy worker).
* A missing file (deleted under a running balancer) is a lost table once any
  version was known (`Store.floor`): a one-host write is `StoreLost`; only a
  whole-table `replace` writes the file again, above the floor.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from balancer.big_loads import loading
from balancer.stores import strict_json
from balancer.stores.acme import Acme, FileAcme
from balancer.stores.atomic import (
    TooLarge,
    cannot_write,
    open_regular,
    read_capped,
    write_atomically,
)
from balancer.stores.base import (
    PAUSE_EVERY,
    CorruptStore,
    Store,
    StoreLost,
    StoreUnavailable,
    TableChecker,
    TableData,
    VersionConflict,
    unreadable_is_corrupt,
    write_version,
)
from balancer.stores.certs import Certs, FileCerts
from balancer.stores.file_watch import FileWatching
from balancer.stores.floors import Raised
from balancer.stores.records import Claimed, FileRecords, Records
from balancer.turns import turn

log = logging.getLogger("balancer.store.file")

LOCK_TIMEOUT = 10.0
LOCK_POLL = 0.005
_RULE_ENCODER = json.JSONEncoder(sort_keys=True)  # one for every rule (json.dumps makes one each)


class FileStore(FileWatching, Store):
    """The routing table in a local JSON file, created empty (version 0) if missing."""

    kind = "file"

    def __init__(self, path: str, strict: bool = True) -> None:
        """`strict` (start-up, a reload's check): `StoreUnavailable` when the file
        cannot be created (its directory missing or read-only) or the path is a
        directory. Not strict (a worker or management process started while the
        balancer runs): the store opens anyway and reports what its reads find.
        Bug: with the directory deleted, or the disk remounted read-only, no
        replacement of a crashed worker or management process could start (a
        crash loop: that slot served nothing, the API was gone)."""
        self.path = os.path.abspath(path)
        self.display_url = f"file:{path}"
        self._reachable = True
        self._problem: str | None = None
        # the file's (inode, size, mtime, ctime) and its table, or why it is corrupt
        self._known: tuple[tuple[int, ...], TableData | str] | None = None
        self._reading = threading.Lock()  # held by a `load` (gevent's, once patched)
        self._lines = _Lines()
        self._checker = TableChecker()
        self._certs: FileCerts | None = None
        try:
            self._create_if_missing()
        except StoreUnavailable:
            if strict:
                raise
            self._reachable = False

    def _create_if_missing(self) -> None:
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise StoreUnavailable(f"{self.path}: the directory {directory} does not exist")
        if os.path.isdir(self.path):
            raise StoreUnavailable(f"{self.path} is a directory; name the routes file "
                                   f"(file:{os.path.join(self.path, 'balancer-routes.json')})")
        with self._locked():
            if not os.path.exists(self.path):
                self._write(TableData(0, {}))

    # reading ---------------------------------------------------------------
    def load(self) -> TableData:
        """The file's table: parsed once per content (`_known`), however many callers
        ask while it is parsed (`_reading`: the watcher's read and the API's wait for
        one another's parse; bug: a file another process rewrote was parsed by both,
        about 1 s each at 100,000 hosts). A corrupt file's problem is kept likewise."""
        with self._reading:
            try:
                with open_regular(self.path) as f:
                    signature = _signature_of(os.fstat(f.fileno()))
                    known = self._known
                    if known is not None and known[0] == signature:
                        self._reachable = True
                        return _known_table(known[1])  # the file last read or written
                    raw = read_capped(f)
            except OSError as exc:
                self._reachable = False
                raise StoreUnavailable(f"{self.path}: cannot read: "
                                       f"{exc.strerror or exc}") from exc
            except TooLarge as exc:  # a regular file of another content: repaired by a write
                raise CorruptStore(f"{self.path}: the file is {exc}") from None
            self._reachable = True
            log.debug("%s: parsing %d bytes", self.path, len(raw))
            try:
                with loading():  # (`balancer.big_loads`: no garbage collection meanwhile)
                    data = self._parse(raw)
            except CorruptStore as exc:
                self._known = (signature, str(exc))
                raise
            self.raise_floor(data.version)
            self._remember(signature, data)
            return data

    def _remember(self, signature: tuple[int, ...] | None, data: TableData) -> None:
        """Keep `data` as the content of the file with `signature` (inode, size, mtime,
        ctime): a write by this instance then costs no parse of the whole file."""
        self._known = (signature, data) if signature is not None else None

    def _parse(self, raw: bytes) -> TableData:
        with unreadable_is_corrupt(f"{self.path}: the file"):
            try:
                doc = strict_json.loads(raw)
            except strict_json.DuplicateKey as exc:
                raise CorruptStore(f"{self.path}: {_repeated(exc)}") from None
            if not isinstance(doc, dict) or set(doc) != {"version", "hosts"}:
                raise CorruptStore(f'{self.path}: expected an object {{"version": N, '
                                   f'"hosts": {{...}}}} with exactly those keys')
            hosts = doc["hosts"]
            texts = _rule_texts(hosts) if isinstance(hosts, dict) else None
            return self._checker.check(self.path, doc["version"], hosts, texts)

    def identity(self) -> str:
        return f"file:{self.path}"

    def own_names(self) -> tuple[str, ...]:
        return (self.display_url, self.path)

    def is_reachable(self) -> bool:
        self._reachable = os.access(self.path, os.R_OK)
        return self._reachable

    def raised(self) -> tuple[Raised, ...]:
        return self._checker.raised

    def last_error(self) -> str | None:
        return self._problem

    def records(self) -> Records:
        """Deploy records in ``PATH.deploys.json``, under the routes file's writer lock."""
        return self._records()

    def _records(self) -> FileRecords:
        return FileRecords(self.path + ".deploys.json", self._locked)

    def certs(self) -> Certs:
        """Certificates in ``PATH.certs.json`` (mode 0600), under the writer lock: one
        object per store, which remembers what it saw (`FileCerts`, the loss guard)."""
        if self._certs is None:
            self._certs = FileCerts(self.path + ".certs.json", self._locked)
        return self._certs

    def acme(self) -> Acme:
        """ACME state in ``PATH.acme.json`` and ``PATH.challenges.json`` (mode 0600)."""
        return FileAcme(self.path, self._locked)

    # writing ---------------------------------------------------------------
    def replace(self, hosts: Mapping[str, Any], if_version: int | None = None) -> int:
        with self._locked():
            try:
                version = self.load().version
            except CorruptStore:
                version = self.floor  # replacing is how a corrupt file is repaired
            except StoreUnavailable:
                if os.path.exists(self.path):
                    raise
                version = 0  # so is writing a deleted file again
            return self._commit(version, if_version, dict(hosts))

    def put_host(self, host: str, rule: Mapping[str, Any], if_version: int | None = None,
                 claimed: Claimed | None = None) -> int:
        """(`Store.put_host`) A `claimed` write renews the claim in the deploy records
        file under the same writer lock, before the table's write."""
        with self._locked():
            current = self._current_for_write()
            if claimed is not None:
                if if_version is not None and if_version != current.version:
                    raise VersionConflict(current.version)  # (the claim left as it is)
                self._records().renew_held(host, claimed)
            hosts = dict(current.hosts)
            hosts[host] = rule
            return self._commit(current.version, if_version, hosts)

    def delete_host(self, host: str, if_version: int | None = None) -> int:
        with self._locked():
            current = self._current_for_write()
            if if_version is not None and if_version != current.version:
                raise VersionConflict(current.version)
            if host not in current.hosts:
                raise KeyError(host)
            hosts = {h: r for h, r in current.hosts.items() if h != host}
            return self._commit(current.version, if_version, hosts)

    def _current_for_write(self) -> TableData:
        """The table under the lock, for a one-host write: `StoreLost` when the
        file is missing or older than a version known (`floor`)."""
        floor = self.floor
        try:
            current = self.load()
        except StoreUnavailable:
            if os.path.exists(self.path):
                raise
            if floor > 0:
                raise StoreLost(self.path, 0, floor) from None
            return TableData(0, {})
        if current.version < floor:
            raise StoreLost(self.path, current.version, floor)
        return current

    def _commit(self, version: int, if_version: int | None, hosts: dict[str, Any]) -> int:
        if if_version is not None and if_version != version:
            raise VersionConflict(version)
        new = TableData(write_version(version, self.floor), hosts)
        self._write(new)
        self.raise_floor(new.version)
        self._problem = None  # written whole: readable again
        return new.version

    def _write(self, data: TableData) -> None:
        """Atomically replace the file (temp file, fsync, rename, fsync dir)."""
        directory = os.path.dirname(os.path.realpath(self.path))  # a link: its target's
        body = self._lines.encode(data)
        try:
            mode = os.stat(self.path).st_mode & 0o777
        except OSError:
            mode = 0o644
        try:
            write_atomically(self.path, body, mode)
            _fsync_dir(directory)
            self._remember(self._signature(), data)
        except OSError as exc:
            raise cannot_write(self.path, exc) from exc

    def lock_path(self) -> str:
        """The writer lock beside the file the path names now, symlinks resolved (bug:
        two balancers reaching one file through different links locked ``LINK.lock``
        each, so their writes could lose one another's)."""
        return os.path.realpath(self.path) + ".lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the exclusive writer lock (polled so gevent keeps running)."""
        lock_path = self.lock_path()
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreUnavailable(
                f"{lock_path}: cannot open lock file: {exc.strerror or exc}") from exc
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while not _try_lock(fd):
                if time.monotonic() > deadline:
                    raise StoreUnavailable(f"{lock_path}: another writer held the lock "
                                           f"for more than {LOCK_TIMEOUT:.0f}s")
                time.sleep(LOCK_POLL)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _signature(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            self._reachable = False
            return None
        self._reachable = True
        return _signature_of(st)


def _known_table(known: TableData | str) -> TableData:
    """The table kept for the file's content, or its problem raised again."""
    if isinstance(known, str):
        raise CorruptStore(known)
    return known


def _rule_texts(hosts: Mapping[str, Any]) -> dict[str, str]:
    """HOST → its rule as text (`TableChecker`'s memo key), the loop going round
    (`turn`) every `PAUSE_EVERY` hosts: 100,000 rules take 0.3 s to encode."""
    texts = {}
    for n, (host, rule) in enumerate(hosts.items()):
        if n % PAUSE_EVERY == PAUSE_EVERY - 1:
            turn()
        texts[host] = _RULE_ENCODER.encode(rule)
    return texts


def _repeated(exc: strict_json.DuplicateKey) -> str:
    """What a key named twice in the file is, by where it is (bug: Python's json kept
    the last of a host listed twice in a hand-edited file, and served it silently)."""
    path, key = exc.path, json.dumps(exc.key)
    if path == ("hosts",):
        return f"the host {key} is listed twice in \"hosts\" (keep one of them)"
    if len(path) >= 2 and path[0] == "hosts":
        return (f"the rule of {json.dumps(path[1])} has the key {key} "
                f"twice{strict_json.where_in(path[2:])} (keep one of them)")
    return f"{exc} (keep one of them)"


def _signature_of(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _Lines:
    """The file's text: the version first, then one line per host in the table's order
    (diff-friendly). A host's line is kept while its rule is the same object (a write
    copies the table but keeps the rules it did not change), so a one-host write
    encodes one rule, not the table."""

    def __init__(self) -> None:
        self.lines: dict[str, tuple[object, str]] = {}

    def encode(self, data: TableData) -> bytes:
        known, lines = self.lines, {}
        for host, rule in data.hosts.items():
            line = known.get(host)
            if line is None or line[0] is not rule:
                line = (rule, f"  {json.dumps(host)}: {_RULE_ENCODER.encode(rule)}")
            lines[host] = line
        self.lines = lines
        inner = "\n" + ",\n".join(text for _, text in lines.values()) + "\n" if lines else ""
        return f'{{"version": {data.version}, "hosts": {{{inner}}}}}\n'.encode()


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise StoreUnavailable(f"cannot lock: {exc.strerror or exc}") from exc
    return True


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
