"""The routing-table routes of the management API (SPEC §5): hosts, backends,
restore, and the one-host write a deploy makes (`write_rule`).

Invariants (with `management.app`'s):
* Rules are validated by `balancer.rules` (the data plane's own validator)
  before any write; a rejected request never changes the table.
* Host keys are normalised (`normalize_host`) here, once, before the store.
* A write answers once every worker of this balancer serves it (the runtime's
  `publish`): 200 ``{"version": N}``, or 202 with ``"applied": false`` and the
  lagging workers after ``[management] apply_timeout``.
* A store that lost its table (the mirror's loss guard, or the store behind
  the highest version known: `Store.floor`) refuses one-host writes with 409
  `store_lost` naming `balancerctl restore`; a whole-table PUT or a restore
  writes above every version known. Reads fall back on the served table, with
  a ``store_problem`` field, while the store is down or lost.
* ``GET /api/v1/hosts`` and ``GET /api/v1/hosts/HOST`` answer 304 to an
  ``If-None-Match`` naming the table's version (`management.conditional`),
  never while a ``store_problem`` is shown (that answer differs at the same
  version). Reads answer with the table this process holds, at the store's
  version or later, and the list's body encoded once per version
  (`management.table_reads`): a read costs one store round trip.
* A deploy's writes (`management/deploy_run.py`) go through `write_rule`: the
  same loss guard and read-your-writes as every one-host write, made only while
  the deploy holds its host's claim (`Claimed`: the store checks and renews it in
  the write's own atomic step).
* Backend edits and deploys read the host's rule alone with the table's version
  (`Store.host_rule`), never the whole table, and write it only if the table is
  still at that version.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

from werkzeug.wrappers import Request, Response

from balancer.rules import (
    host_rule_problems,
    normalize_host,
    validate_host,
    validate_rule,
    validate_table,
)
from balancer.stores import CorruptStore, Store, StoreUnavailable, TableData, VersionConflict
from balancer.stores.records import Claimed
from balancer.stores.snapshot import rewritten
from management import edits
from management.conditional import create_only, none_match, not_modified
from management.http import (
    ApiError,
    if_match,
    json_response,
    read_json,
    version_headers,
)
from management.mirror import Mirror
from management.runtime import Runtime
from management.table_reads import TableReads, list_body

log = logging.getLogger("balancer.management")

EDIT_ATTEMPTS = 20  # read-modify-write retries for backend edits without If-Match
# the longest pause before the next attempt (jittered, doubling from 5 ms): edits that
# raced one another spread out instead of racing again at once. Bug: 20 concurrent
# backend adds to one Redis store (instances registering at boot) failed 5 with 503.
# The 19 pauses add up to 3.6 s at most; none follows the last attempt.
EDIT_PAUSE_CAP = 0.25


class HostRoutes:
    """The `on_<endpoint>` methods of the table's routes (a part of `ManagementApp`)."""

    store: Store
    runtime: Runtime
    mirror: Mirror
    table_reads: TableReads

    def on_list_hosts(self, request: Request) -> Response:
        data, problem = self._readable()
        headers = version_headers(data.version)
        if problem:
            return json_response({**list_body(data), "store_problem": problem},
                                 headers=headers)
        if none_match(request, data.version):
            return not_modified(headers)
        return json_response(self.table_reads.body(data), headers=headers)

    def _readable(self) -> tuple[TableData, str | None]:
        """The table at the store's version; the table served (and why) when the store
        lost its table or cannot be read but this process knows the served one
        (`TableReads.readable`)."""
        return self.table_reads.readable()

    def on_replace_hosts(self, request: Request) -> Response:
        condition = if_match(request)
        body = read_json(request)
        if not isinstance(body, dict) or "hosts" not in body:
            raise _invalid(['body: must be {"hosts": {HOST: RULE, ...}}'])
        extra = [f"{k}: unknown field" for k in body if k not in ("hosts", "version")]
        problems = extra + validate_table(body["hosts"])
        if problems:
            raise _invalid(problems)
        hosts = {normalize_host(h): rule for h, rule in body["hosts"].items()}
        self._raise_floor()
        version = self.store.replace(hosts, condition)
        self.mirror.note_write(version, None, hosts)
        return self._published(version, None)

    def on_get_host(self, request: Request, host: str) -> Response:
        key = normalize_host(host)
        data, problem = self._readable()
        if key not in data.hosts:
            raise _no_host(key)
        headers = version_headers(data.version)
        if problem is None and none_match(request, data.version):
            return not_modified(headers)
        body = {"host": key, "rule": data.hosts[key], "version": data.version}
        if problem:
            body["store_problem"] = problem
        return json_response(body, headers=headers)

    def on_put_host(self, request: Request, host: str) -> Response:
        condition = if_match(request)
        absent = create_only(request, creates=True)
        rule = read_json(request)
        problems = validate_host(host) + validate_rule(rule) + host_rule_problems(host, rule)
        if problems:
            raise _invalid(problems)
        key = normalize_host(host)
        if absent:
            return self._edit_rule(key, condition, lambda key, found: _absent(key, found, rule))
        self._check_not_lost()
        return self._after_write(self.store.put_host(key, rule, condition), {key: rule})

    def on_delete_host(self, request: Request, host: str) -> Response:
        condition = if_match(request)
        key = normalize_host(host)
        self._check_not_lost()
        try:
            version = self.store.delete_host(key, condition)
        except KeyError:
            raise _no_host(key) from None
        return self._after_write(version, {key: None})

    def on_add_backend(self, request: Request, host: str) -> Response:
        condition = if_match(request)
        address, weight = edits.parse_backend_body(read_json(request))
        return self._edit_rule(normalize_host(host), condition,
                               lambda key, rule: edits.with_backend(_proxy_rule(key, rule),
                                                                    address, weight))

    def on_remove_backend(self, request: Request, host: str, address: str) -> Response:
        condition = if_match(request)
        return self._edit_rule(normalize_host(host), condition,
                               lambda key, rule: edits.without_backend(
                                   key, _proxy_rule(key, rule), address))

    def _edit_rule(self, key: str, condition: int | None,
                   edit: Callable[[str, dict[str, Any] | None], dict[str, Any]]) -> Response:
        """Read-modify-write one host's rule (`edit` of the rule there, None when
        absent), retried while other writers race us: the
        host's rule is read with the table's version (`Store.host_rule`: not the
        whole table; bug: 1-2 s of CPU per edit at 100,000 hosts on Redis), and
        written only if the table is still at that version."""
        self._check_not_lost()
        for attempt in range(EDIT_ATTEMPTS):
            if attempt:  # after a race: a pause, so that the racers spread out
                time.sleep(random.uniform(0, min(EDIT_PAUSE_CAP, 0.005 * 2 ** (attempt - 1))))
            found = self.store.host_rule(key)
            if condition is not None and condition != found.version:
                raise VersionConflict(found.version)
            rule = edit(key, None if found.rule is None else dict(found.rule))
            problems = validate_rule(rule)
            if problems:
                raise _invalid(problems)
            try:
                return self._after_write(self.store.put_host(key, rule, found.version),
                                         {key: rule})
            except VersionConflict:
                if condition is not None:
                    raise
        raise StoreUnavailable(f"the table kept changing during {EDIT_ATTEMPTS} attempts; "
                               f"try again")

    def write_rule(self, key: str, rule: dict[str, Any], if_version: int,
                   claimed: Claimed) -> int:
        """A deploy's write of one host's rule while it holds the host's claim
        (`claimed`: `HandedOver` else), answered once every worker serves it
        (`VersionConflict` when the table moved past `if_version`, `ApiError` 409
        `store_lost` when the store lost its table)."""
        self._check_not_lost()
        version = self.store.put_host(key, rule, if_version, claimed)
        self.mirror.note_write(version, {key: rule})
        publish = getattr(self.runtime, "publish", None)
        lagging = publish(version, {key: rule}) if publish else []
        if lagging:
            log.warning("deploy of %s: version %d not served yet by %s", key, version, lagging)
        return version

    def check_writable(self) -> None:
        """409 `store_lost` while the store lost its table (as one-host writes)."""
        self._check_not_lost()

    def _raise_floor(self) -> None:
        """Writes go above every version this balancer has known (workers, snapshot)."""
        highest = getattr(self.runtime, "highest_version", None)  # older Runtimes lack it
        self.store.raise_floor(max(self.mirror.highest, highest() if highest else 0))

    def _check_not_lost(self) -> None:
        """409 `store_lost` when a one-host write would leave a one-host table."""
        self._raise_floor()
        if self.mirror.problem:
            raise ApiError(409, "store_lost", self.mirror.problem)

    def _after_write(self, version: int, changes: dict[str, Any]) -> Response:
        self.mirror.note_write(version, changes)
        return self._published(version, changes)

    def _published(self, version: int, changes: dict[str, Any] | None,
                   extra: dict[str, Any] | None = None) -> Response:
        """The answer to a write, once every worker serves `version` (202 if one does
        not within `apply_timeout`)."""
        publish = getattr(self.runtime, "publish", None)  # older Runtimes lack it
        lagging = publish(version, changes) if publish else []
        body = {"version": version, **(extra or {})}
        if lagging:
            return json_response({**body, "applied": False, "lagging": lagging}, status=202,
                                 headers=version_headers(version))
        return json_response(body, headers=version_headers(version))

    def _restorable(self, served: TableData) -> int | None:
        """The store's version, for the conditional write of a restore (None when the
        store cannot be read: damaged or deleted, which a restore repairs); 409
        `nothing_to_restore` when the store holds the table served or a newer one
        (judged on this read, as the mirror judges: a loss it reported may be
        stale). Bug: a restore on a store that was ahead (another balancer's
        write, or its restore and writes since, not yet applied here) wrote the
        older served table over it."""
        try:
            current = self.store.load()
        except (StoreUnavailable, CorruptStore):
            return None
        if (current.version < served.version
                or rewritten(current, served, self.store.display_url)):
            return current.version  # behind, or another table at its version
        raise ApiError(409, "nothing_to_restore",
                       f"the store holds version {current.version}, not behind the table "
                       f"this balancer serves (version {served.version}): it lost nothing, "
                       f"and a restore would undo the writes since; PUT a whole table to "
                       f"/api/v1/hosts to replace it")

    def on_restore(self, request: Request) -> Response:
        """Write the table the workers serve back to the store, above every version
        known: the operator's answer to a store that lost its table."""
        served = self.mirror.table
        if served is None:
            raise ApiError(409, "nothing_to_restore",
                           "this balancer knows no table to restore: it has served none since "
                           "it started and has no snapshot; PUT a whole table to "
                           "/api/v1/hosts instead")
        self._raise_floor()
        version = self.store.replace(served.hosts, self._restorable(served))
        log.warning("restore: wrote the served table (version %d, %d hosts) back to store %s "
                    "as version %d", served.version, len(served.hosts), self.store.display_url,
                    version)
        self.mirror.note_write(version, None, served.hosts)
        return self._published(version, None, {"restored_from": served.version,
                                               "hosts": len(served.hosts)})


def _invalid(problems: list[str]) -> ApiError:
    n = len(problems)
    return ApiError(400, "invalid_rule", f"the rule is invalid ({n} problem"
                    f"{'s' if n != 1 else ''})", problems)


def _no_host(key: str) -> ApiError:
    return ApiError(404, "not_found", f"no rule for host {key!r}")


def _proxy_rule(key: str, rule: dict[str, Any] | None) -> dict[str, Any]:
    """`rule`, the proxy rule a backend edit changes (404 when absent, 400 another action)."""
    if rule is None:
        raise _no_host(key)
    edits.require_proxy(key, rule)
    return rule


def _absent(key: str, found: dict[str, Any] | None, rule: dict[str, Any]) -> dict[str, Any]:
    """`rule`, written by ``If-None-Match: *`` only where `key` has none (`found`)."""
    if found is not None:
        raise ApiError(412, "host_exists", f"host {key!r} has a rule (If-None-Match: *); "
                       f"drop the condition to replace it")
    return rule
