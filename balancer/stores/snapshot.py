"""The store loss guard and the local snapshot of the last good table (SPEC §6).

Invariants:
* Store loss is not a command: a table the store delivers replaces the one
  served only if its version is at least the highest version this balancer
  has known (`judge`). An emptied Redis (version 0), a restored older copy or
  a deleted routes file keeps the served table in force and is reported with
  what to do (`balancerctl restore`, or a whole-table PUT).
* The snapshot file holds the last good table and the store it came from
  (`Store.identity`); a snapshot of another store is ignored, never served.
  It is written atomically (temp file, fsync, rename) by the management
  process, and read by every process at start: a balancer started while its
  store is unreachable (or lost) serves the last table it knew.
* Besides the file `store.snapshot` names (which may be ``off``, or beside a
  routes file whose directory is gone), the management process keeps a copy
  in the balancer's private run directory (`run_copy_path`), whatever that
  setting: a worker or management process the arbiter starts again (a crash,
  a reload) while the store cannot be read serves the table its siblings
  serve, not the no-hosts page. `load` takes the newest of the two.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any

from balancer.stores.atomic import TooLarge, read_regular, write_atomically
from balancer.stores.base import StoreError, TableData, check_table

log = logging.getLogger("balancer.store")

OFF = "off"
HOW_TO_FIX = ("run `balancerctl restore` (POST /api/v1/restore) to write the served table "
              "back to the store, or PUT a whole table to /api/v1/hosts")


def judge(data: TableData, highest: int, where: str) -> str | None:
    """None when `data` may replace the table served; otherwise the problem."""
    if data.version >= highest:
        return None
    state = "empty" if data.version == 0 and not data.hosts else f"at version {data.version}"
    return (f"store {where} is {state} but this balancer has served version {highest}: "
            f"the store lost its table (flushed, restarted empty, restored from an older "
            f"copy, or its file deleted). Keeping the served table; {HOW_TO_FIX}")


def rewritten(data: TableData, served: TableData | None, where: str) -> str | None:
    """The problem when `data` is another table at the version of `served`: every
    write raises the version, so the store was changed some other way. Bug: ``DEL
    NS:hosts`` (or Redis evicting the hash under a ``maxmemory-policy``, keeping the
    small version key) was taken as that version's table: the management API showed
    it, the snapshot kept it, and a worker started afterwards served it (no hosts)."""
    if served is None or data.version != served.version or data == served:
        return None
    return (f"store {where} holds another table at version {data.version} "
            f"({len(data.hosts)} hosts) than the one this balancer serves at that version "
            f"({len(served.hosts)} hosts): it was changed without raising the version (a "
            f"hand edit that kept it, a key deleted, or evicted by Redis's "
            f"maxmemory-policy). Keeping the served table; raise the version of a hand "
            f"edit, or {HOW_TO_FIX}")


def snapshot_path(setting: str, store: Any) -> str | None:
    """The snapshot file for `store`: the `store.snapshot` setting, or the default
    beside the routes file (file store) or in the working directory (Redis); None
    when the setting is ``off``."""
    if setting == OFF:
        return None
    if setting:
        return os.path.abspath(setting)
    path = getattr(store, "path", None)
    if isinstance(path, str):
        return path + ".last-good"
    namespace = getattr(store, "namespace", "balancer")
    return os.path.abspath(f"balancer-{namespace}.last-good.json")


def run_copy_path(run_dir: str, identity: str) -> str:
    """The snapshot's copy in the run directory, named after the store (a reload that
    changes `store.url` runs two management processes side by side for a while)."""
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return os.path.join(run_dir, f"last-good-{digest}.json")


class Snapshot:
    """The last good table of one store, kept in a local file (`path`, None when
    ``off``) and, in a running balancer, in its run directory (`run_copy`)."""

    def __init__(self, path: str | None, identity: str, run_copy: str | None = None) -> None:
        self.path = path
        self.identity = identity
        self.run_copy = run_copy
        self.loaded_from: str | None = None  # the file `load` took its table from
        self.partial = False  # a file lacked what `load` found: the next save writes it
        self._write_problems: dict[str, str] = {}

    @classmethod
    def of(cls, setting: str, store: Any, run_dir: str | None) -> Snapshot:
        """The snapshot of `store` for the `store.snapshot` setting, with its copy in
        `run_dir` (None: a process outside a balancer's process tree, no copy)."""
        identity = store.identity()
        return cls(snapshot_path(setting, store), identity,
                   run_copy_path(run_dir, identity) if run_dir else None)

    def files(self) -> list[str]:
        return [p for p in (self.path, self.run_copy) if p is not None]

    def load(self) -> TableData | None:
        """The newest table saved for this store, or None (missing, unreadable, another
        store's); `loaded_from` says which file it came from. Both files hold the same
        bytes after a save: then one is decoded, and only the newest is validated."""
        texts: list[tuple[bytes, str]] = []
        read = 0
        for path in self.files():
            raw = self._read(path)
            if raw is None:
                continue
            read += 1
            if all(raw != seen for seen, _ in texts):
                texts.append((raw, path))
        docs = [(doc, path) for raw, path in texts if (doc := self._decode(raw, path))]
        docs.sort(key=lambda d: d[0]["version"] if isinstance(d[0]["version"], int) else -1,
                  reverse=True)
        for doc, path in docs:
            try:
                # (keys in any form: a table served before they had to be in key
                # form, by a version that served them, still serves at start-up)
                data = check_table(path, doc["version"], doc["hosts"], key_form=False)
            except StoreError as exc:
                log.warning("snapshot %s: %s; not using it", path, exc)
                continue
            self.loaded_from = path
            # every file holds the bytes it came from only when all were read alike
            # (bug: two files alike counted as one, a copy lacking, at every start)
            self.partial = read < len(self.files()) or len(texts) > 1
            return data
        return None

    def describe(self) -> str:
        """Where the loaded table came from and how old it is, for a store problem."""
        try:
            age = f", saved {time.time() - os.stat(str(self.loaded_from)).st_mtime:.0f} s ago"
        except OSError:
            age = ""
        return f"{self.loaded_from}{age}"

    @staticmethod
    def _read(path: str) -> bytes | None:
        try:
            return read_regular(path)
        except FileNotFoundError:
            return None
        except (OSError, TooLarge) as exc:
            log.warning("snapshot %s: cannot read it (%s); not using it", path, exc)
            return None

    def _decode(self, raw: bytes, path: str) -> dict[str, Any] | None:
        """The saved document when it is this store's, else None (logged)."""
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            log.warning("snapshot %s: cannot read it (%s); not using it", path,
                        "nested too deeply" if isinstance(exc, RecursionError) else exc)
            return None
        if not isinstance(doc, dict) or doc.get("store") != self.identity:
            log.warning("snapshot %s: saved for another store (%r, not %r); not using it",
                        path, doc.get("store") if isinstance(doc, dict) else None,
                        self.identity)
            return None
        return {"version": doc.get("version"), "hosts": doc.get("hosts")}

    def save(self, data: TableData) -> None:
        """Replace the files atomically; a failure is logged once, never raised."""
        if not self.files():
            return
        body = json.dumps({"store": self.identity, "version": data.version,
                           "saved": time.time(), "hosts": data.hosts},
                          separators=(",", ":")).encode()
        for path in self.files():
            try:
                write_atomically(path, body)
            except OSError as exc:
                self._note_problem(path, f"snapshot {path}: cannot write it: "
                                         f"{exc.strerror or exc}")
                continue
            self._write_problems.pop(path, None)

    def _note_problem(self, path: str, problem: str) -> None:
        if self._write_problems.get(path) != problem:
            advice = ("a process started again while the store cannot be read has "
                      "only store.snapshot to start from" if path == self.run_copy else
                      "a restart while the store is unreachable would start with no "
                      "table; set store.snapshot to a writable path")
            log.error("%s (%s)", problem, advice)
        self._write_problems[path] = problem
