"""The deploy routes of the management API (SPEC §10, docs/api.md).

* ``POST /api/v1/hosts/HOST/deploy`` ``{"backends": [...], "ready_timeout": 60,
  "drain_timeout": 30, "warmup": 10}`` → 202 ``{"deploy": RECORD}``
* ``POST /api/v1/hosts/HOST/rollback`` (same optional timings) → 202, a deploy
  back to the backends the host's last finished deploy moved away from
* ``DELETE /api/v1/hosts/HOST/deploy`` (the deploy running on HOST when the
  request arrived) or ``DELETE /api/v1/deploys/ID`` (that one) → 200
  ``{"deploy": RECORD}`` (ended ``aborted``, and only then) or 202 (asked, still
  stopping: its abort waits for the new backends' requests in flight); 409
  `nothing_to_abort`, 404 `not_found`; 503 when it is asked but not carried out
  yet for a reason the operator must know (its write refused:
  ``abort.problem``; the store gone while the answer waited; the request not
  replicated)
* ``GET /api/v1/deploys`` → ``{"deploys": [RECORD...]}`` newest first;
  ``GET /api/v1/deploys/ID`` → ``{"deploy": RECORD}``; 410 `deploy_gone` for a
  deploy that ended and whose record is no longer kept (`Records.gone`)

Invariants: a request that is refused (400 `invalid_deploy`, 404, 409
`deploy_in_progress` / `nothing_to_roll_back` / `nothing_to_abort`) starts
nothing and changes nothing. An abort is answered by any balancer sharing the
store, whichever runs the deploy: it is a request in the store
(`Deployer.ask_abort`), which the abort's answer waits for (`ABORT_WAIT`). An
abort names one deploy, the one asked or the one running when the request
arrived, and never stops another (bug: a DELETE sent after a deploy ended
stopped the next deploy of the host). While the answer waits, a request the
store lost before the deploy took it up (Redis restarted empty) is asked again,
and a read that fails keeps the record last read.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

from werkzeug.wrappers import Request, Response

from balancer.rules import MAX_HOLD, normalize_host, validate_rule
from balancer.stores import HostRule, StoreError, StoreNotReplicated, VersionConflict
from balancer.stores.records import MAX_DEPLOYS, MAX_GONE
from management.deploy_abort import ABORT_RETRY
from management.deploy_steps import spelling_problems
from management.deploys import Busy, Deployer
from management.http import ApiError, Route, if_match, json_response, read_json

DEFAULTS = {"ready_timeout": 60.0, "drain_timeout": 30.0, "warmup": 10.0}
MINIMUM = {"ready_timeout": 0.001, "drain_timeout": 0.001, "warmup": 0.0}
ABORT_WAIT = 5.0   # seconds an abort's answer waits for the deploy to end (else 202)
ABORT_POLL = 0.05
# the status of an abort not carried out yet, or given up, by its cause's error code
# (``abort.code``; 503 else): bug, always 503 store_unavailable, even for a table that
# kept changing or a store that lost its table
CAUSES = {"version_conflict": 412, "store_lost": 409}

RULES = [
    Route("/api/v1/hosts/<host>/deploy", endpoint="deploy", methods=["POST"]),
    Route("/api/v1/hosts/<host>/deploy", endpoint="abort_deploy", methods=["DELETE"]),
    Route("/api/v1/hosts/<host>/rollback", endpoint="rollback", methods=["POST"]),
    Route("/api/v1/deploys", endpoint="list_deploys", methods=["GET"]),
    Route("/api/v1/deploys/<deploy_id>", endpoint="get_deploy", methods=["GET"]),
    Route("/api/v1/deploys/<deploy_id>", endpoint="abort_one", methods=["DELETE"]),
]


def invalid(problems: list[str]) -> ApiError:
    return ApiError(400, "invalid_deploy", f"the deploy request is invalid ({len(problems)} "
                    f"problem{'s' if len(problems) != 1 else ''})", problems)


def timings(body: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """The deploy's timings (defaults filled in) and the problems with them."""
    settings, problems = dict(DEFAULTS), []
    for key, low in MINIMUM.items():
        if key not in body:
            continue
        value = body[key]
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not math.isfinite(value) or value < low or value > MAX_HOLD):
            bound = "> 0" if low else ">= 0"
            problems.append(f"{key}: must be a number of seconds {bound} and at most "
                            f"{MAX_HOLD}, got {value!r}")
        else:
            settings[key] = float(value)
    return settings, problems


def parse_deploy(body: Any, need_backends: bool = True) -> tuple[list[Any], dict[str, float]]:
    """The new backends and timings of a deploy body, or 400 `invalid_deploy`."""
    if body is None and not need_backends:
        body = {}
    if not isinstance(body, dict):
        raise invalid(['body: must be {"backends": [...], "ready_timeout": S, '
                       '"drain_timeout": S, "warmup": S}'])
    known = {"backends", *DEFAULTS} if need_backends else set(DEFAULTS)
    problems = [f"{k}: unknown field" for k in body if k not in known]
    settings, bad = timings(body)
    problems += bad
    backends = body.get("backends")
    if need_backends:
        problems += validate_rule({"action": "proxy", "backends": backends})
    if problems:
        raise invalid(problems)
    return list(backends or ()), settings


def current_rule(app: Any, key: str, condition: int | None = None) -> HostRule:
    """The host's rule as stored now, with the table's version (`Store.host_rule`:
    not the whole table); 412 `version_conflict` when the table is not at the
    version `condition` (``If-Match``) asks for: the deploy would start from
    another rule than the one the client read (bug: ``If-Match`` was ignored)."""
    found: HostRule = app.store.host_rule(key)
    if found.rule is None:
        raise ApiError(404, "not_found", f"no rule for host {key!r}")
    if condition is not None and condition != found.version:
        raise VersionConflict(found.version)
    return found


def no_version(request: Request) -> None:
    """400 `invalid_header` for an abort sent with ``If-Match`` (bug: ignored, as
    if the abort were made only at that table version): an abort names its deploy
    by its path instead."""
    if request.headers.get("If-Match") is not None:
        raise ApiError(400, "invalid_header", "If-Match: an abort is made at no table "
                       "version; to abort one deploy only, name it: DELETE "
                       "/api/v1/deploys/ID")


def start(deployer: Deployer, key: str, found: HostRule, to: list[Any],
          settings: dict[str, float], kind: str) -> dict[str, Any]:
    rule = found.rule or {}
    old = list(rule.get("backends", ())) if rule.get("action") == "proxy" else []
    problems = spelling_problems(old, to)
    if problems:
        raise invalid(problems)
    try:
        return deployer.start(key, found, to, settings, kind)
    except Busy as exc:
        raise ApiError(409, "deploy_in_progress",
                       f"host {key!r} has a deploy running ({exc.deploy_id}); wait for it "
                       f"to end (GET /api/v1/deploys/{exc.deploy_id})",
                       [f"deploy: {exc.deploy_id}"]) from None


def deploy(app: Any, key: str, body: Any, condition: int | None = None) -> dict[str, Any]:
    to, settings = parse_deploy(body)
    app.check_writable()
    return start(app.deployer, key, current_rule(app, key, condition), to, settings,
                 "deploy")


def rollback(app: Any, key: str, body: Any, condition: int | None = None) -> dict[str, Any]:
    _, settings = parse_deploy(body, need_backends=False)
    app.check_writable()
    found = current_rule(app, key, condition)
    last = next((r for r in app.deployer.records.deploys()
                 if r.get("host") == key and r.get("state") == "done"), None)
    if last is None or not last.get("from"):
        raise ApiError(409, "nothing_to_roll_back",
                       f"host {key!r} has no finished deploy from other backends to go back "
                       f"to (the deploy records keep the recent ones: GET /api/v1/deploys)")
    return start(app.deployer, key, found, list(last["from"]), settings, "rollback")


def abort(app: Any, key: str | None, deploy_id: str | None = None
          ) -> tuple[dict[str, Any], int]:
    """Ask the deploy `deploy_id` (None: the one running on the host `key` now) to
    stop and wait (`ABORT_WAIT`) for it to end: its record, and 200 when it ended
    aborted or 202 while it still stops; an error when it is not running, or when
    the abort is asked but not carried out yet for a reason the operator must know
    (its write refused, the store gone, the request not replicated)."""
    if deploy_id is None:
        deploy_id = _running(app, str(key))
    key = str(key) if key is not None else _host_of(app, deploy_id)
    request = {"at": time.time(), "by": app.deployer.owner}
    unreplicated = None
    try:
        asked = app.deployer.ask_abort(key, request, deploy_id)
    except StoreNotReplicated as exc:  # the master has the request: it is carried out
        unreplicated, asked = exc, deploy_id
    if asked is None:  # (it ended, or was handed over, since)
        raise _not_running(app, key, deploy_id)
    record, freed = _waited(app, key, deploy_id, request)
    if not freed:
        return _still_running(key, record, unreplicated), 202
    if record.get("abort") is None:  # it ended before its process saw the request
        raise ApiError(409, "nothing_to_abort", _ended_before(key, record),
                       [f"deploy: {deploy_id}"])
    if record.get("state") != "aborted":
        code = str(record["abort"].get("code") or "store_unavailable")
        raise ApiError(CAUSES.get(code, 503), code, f"host {key!r}: deploy {deploy_id} was "
                       f"aborted, and failed: {record.get('error')}", [f"deploy: {deploy_id}"])
    return record, 200


def _running(app: Any, key: str) -> str:
    """The id of the deploy running on `key` as the request arrived (its claim's), or
    404 `not_found` / 409 `nothing_to_abort` when none runs."""
    claimed = (app.deployer.records.claims().get(key) or {}).get("id")
    if claimed:
        return str(claimed)
    if app.store.host_rule(key).rule is None:
        raise ApiError(404, "not_found", f"no rule for host {key!r} and no deploy of it "
                       f"running")
    raise ApiError(409, "nothing_to_abort", f"host {key!r} has no deploy running "
                   f"(GET /api/v1/deploys lists the recent ones)")


def _host_of(app: Any, deploy_id: str) -> str:
    """The host of the deploy `deploy_id` (from its record, kept or gone), or 404."""
    known = app.deployer.records.deploy(deploy_id) or app.deployer.records.gone(deploy_id)
    if known is None or not isinstance(known.get("host"), str):
        raise _unknown(deploy_id)
    return str(known["host"])


def _not_running(app: Any, key: str, deploy_id: str) -> ApiError:
    """409 `nothing_to_abort` for the deploy `deploy_id` of `key`, which holds no
    claim on the host (it ended, or its record went: `Records.gone`)."""
    record = app.deployer.records.deploy(deploy_id)
    if record is not None and record.get("state") != "running":
        return ApiError(409, "nothing_to_abort", _ended_before(key, record),
                        [f"deploy: {deploy_id}"])
    if record is None:
        gone = app.deployer.records.gone(deploy_id)
        if gone is None:
            return _unknown(deploy_id)
        return ApiError(409, "nothing_to_abort", f"host {key!r}: deploy {deploy_id} ended "
                        f"{gone.get('state')}{_at(gone.get('ended'))} (its record is no "
                        f"longer kept), so there is nothing to abort", [f"deploy: {deploy_id}"])
    return ApiError(409, "nothing_to_abort", f"host {key!r}: deploy {deploy_id} holds no "
                    f"claim on the host (no management process runs it; its record says "
                    f"it runs at step {record.get('step')}), so there is nothing to abort",
                    [f"deploy: {deploy_id}"])


def _at(when: Any) -> str:
    """`` at TIME`` (UTC) for the unix time `when`, "" when it is no number."""
    if isinstance(when, bool) or not isinstance(when, int | float) or not math.isfinite(when):
        return ""
    return time.strftime(" at %Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


def _unknown(deploy_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no deploy {deploy_id!r}: the records keep every "
                    f"running deploy, the {MAX_DEPLOYS} that ended last and, by id, the "
                    f"{MAX_GONE} that ended before them; so it is not running")


def _waited(app: Any, key: str, deploy_id: str, request: dict[str, Any]
            ) -> tuple[dict[str, Any], bool]:
    """The deploy's record once it ended and freed the host, or after `ABORT_WAIT`
    (with False: still running, or its claim not released yet). A read that fails
    keeps the record last read, unless the last look fails too (bug: one read
    hiccup answered 503 "the store could not be read"); a request the store lost
    before the deploy took it up is asked again (`_ask_again`)."""
    deadline = time.monotonic() + ABORT_WAIT
    record: dict[str, Any] | None = None
    failure: StoreError | None = None
    while True:
        try:
            record = app.deployer.records.deploy(deploy_id)
            if record is not None and _freed(app, key, record):
                return record, True
            _ask_again(app, key, deploy_id, request, record)
            failure = None
        except StoreError as exc:
            failure = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(ABORT_POLL)
    if record is not None and failure is None:
        return record, _let_go(app, key, record)
    if failure is None and app.deployer.records.gone(deploy_id) is not None:
        raise _not_running(app, key, deploy_id)
    why = f"then the store could not be read ({failure})" if failure is not None else \
        "then the store no longer held its record (restarted empty, flushed?)"
    raise ApiError(503, "store_unavailable", f"host {key!r}: the abort of deploy {deploy_id} "
                   f"was asked, {why}: the deploy carries the abort out once it can "
                   f"(GET /api/v1/deploys/{deploy_id} follows it)", [f"deploy: {deploy_id}"])


def _let_go(app: Any, key: str, record: dict[str, Any]) -> bool:
    """Whether the deploy `record` ended, its process done with the store: its claim,
    which that process could not release (the store away a moment), released here
    (bug: answered 202 with the record of a deploy that had ended aborted). Not
    while its record names a problem: its process still tries to save its end (the
    replicas not acknowledging it), which the answer says (`_still_running`)."""
    if record.get("state") == "running" or (record.get("abort") or {}).get("problem"):
        return False
    with contextlib.suppress(StoreError):  # (it frees itself once stale)
        app.deployer.records.release(key, record["id"])
    return True


def _ask_again(app: Any, key: str, deploy_id: str, request: dict[str, Any],
               record: dict[str, Any] | None) -> None:
    """Store the abort `request` again if the deploy has not taken it up (its record,
    None: lost with the store, says no abort) and the store no longer has it (bug:
    Redis restarted empty between the request and the deploy's next look, the
    answer was 202 and nothing aborted). Made only while the deploy holds its host
    (`Records.request_abort`)."""
    records = app.deployer.records
    if (record is None or record.get("abort") is None) and \
            records.abort_request(deploy_id) is None:
        records.request_abort(key, request, deploy_id)


def _still_running(key: str, record: dict[str, Any],
                   unreplicated: StoreNotReplicated | None) -> dict[str, Any]:
    """The record of a deploy still stopping after `ABORT_WAIT` (answered 202), or the
    error saying why its abort is not carried out yet."""
    deploy_id = record["id"]
    asked = record.get("abort") or {}
    problem = asked.get("problem")
    if problem:
        code = str(asked.get("code") or "store_unavailable")  # (a record of before 2026-12-07)
        raise ApiError(CAUSES.get(code, 503), code, f"host {key!r}: the abort of deploy "
                       f"{deploy_id} is asked, but not carried out yet: {problem}; its writes "
                       f"are tried again (every {ABORT_RETRY:g} s at most) until "
                       f"the store takes them (GET /api/v1/deploys/{deploy_id} follows it)",
                       [f"deploy: {deploy_id}", f"problem: {problem}"])
    if unreplicated is not None:
        raise ApiError(503, "store_not_replicated", f"{unreplicated.where}: the abort of "
                       f"deploy {deploy_id} of {key!r} was asked on the Redis master, and the "
                       f"deploy is carrying it out, but {unreplicated.reason}: a failover "
                       f"before it is replicated may lose the request; GET /api/v1/deploys/"
                       f"{deploy_id} shows whether it ended aborted, and asking again is safe "
                       f"(an abort asked twice is carried out once)", [f"deploy: {deploy_id}"])
    return record


def _ended_before(key: str, record: dict[str, Any]) -> str:
    """Why an abort that reached the deploy `record` too late changed nothing."""
    ended = f"host {key!r}: deploy {record['id']} ended {record.get('state')} before the " \
            f"abort reached it, so the abort changed nothing"
    if record.get("state") == "done":
        return (f"{ended}: the new backends serve and the old ones were drained; to go "
                f"back to them, roll back (POST /api/v1/hosts/{key}/rollback, balancerctl "
                f"rollback {key})")
    return f"{ended}: {record.get('error')}"


def _freed(app: Any, key: str, record: dict[str, Any]) -> bool:
    """Whether the deploy `record` ended and let its host go (its record ends a
    moment before its claim is released: a deploy sent on the abort's answer
    must not find it still claimed)."""
    if record.get("state") == "running":
        return False
    claim = app.deployer.records.claims().get(key) or {}
    return bool(claim.get("id") != record.get("id"))


def find(app: Any, deploy_id: str) -> dict[str, Any]:
    """The deploy's record; 410 `deploy_gone` when it ended and its record went (bug:
    404 "no deploy", as for one that never was), 404 when it is unknown."""
    record = app.deployer.records.deploy(deploy_id)
    if record is not None:
        return record
    gone = app.deployer.records.gone(deploy_id)
    if gone is None:
        raise _unknown(deploy_id)
    raise ApiError(410, "deploy_gone", f"deploy {deploy_id} of {gone.get('host')!r} ended "
                   f"{gone.get('state')}{_at(gone.get('ended'))}; its record is no longer "
                   f"kept (the records keep every running deploy and the {MAX_DEPLOYS} "
                   f"that ended last)", [f"deploy: {deploy_id}", f"state: {gone.get('state')}"])


class DeployRoutes:
    """The `on_<endpoint>` methods of the deploy routes (a part of `ManagementApp`)."""

    deployer: Deployer

    def on_deploy(self, request: Request, host: str) -> Response:
        record = deploy(self, normalize_host(host), read_json(request), if_match(request))
        return json_response({"deploy": record}, status=202)

    def on_rollback(self, request: Request, host: str) -> Response:
        body = read_json(request) if request.content_length else None
        record = rollback(self, normalize_host(host), body, if_match(request))
        return json_response({"deploy": record}, status=202)

    def on_abort_deploy(self, request: Request, host: str) -> Response:
        no_version(request)
        record, status = abort(self, normalize_host(host))
        return json_response({"deploy": record}, status=status)

    def on_abort_one(self, request: Request, deploy_id: str) -> Response:
        no_version(request)
        record, status = abort(self, None, deploy_id)
        return json_response({"deploy": record}, status=status)

    def on_list_deploys(self, request: Request) -> Response:
        return json_response({"deploys": self.deployer.records.deploys()})

    def on_get_deploy(self, request: Request, deploy_id: str) -> Response:
        return json_response({"deploy": find(self, deploy_id)})
