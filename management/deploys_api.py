"""The deploy routes of the management API (SPEC §10, docs/api.md).

* ``POST /api/v1/hosts/HOST/deploy`` ``{"backends": [...], "ready_timeout": 60,
  "drain_timeout": 30, "warmup": 10}`` → 202 ``{"deploy": RECORD}``
* ``POST /api/v1/hosts/HOST/rollback`` (same optional timings) → 202, a deploy
  back to the backends the host's last finished deploy moved away from
* ``GET /api/v1/deploys`` → ``{"deploys": [RECORD...]}`` newest first;
  ``GET /api/v1/deploys/ID`` → ``{"deploy": RECORD}``

Invariants: a request that is refused (400 `invalid_deploy`, 404, 409
`deploy_in_progress` / `nothing_to_roll_back`) starts nothing and changes
nothing.
"""

from __future__ import annotations

import math
from typing import Any

from werkzeug.routing import Rule
from werkzeug.wrappers import Request, Response

from balancer.rules import MAX_HOLD, normalize_host, validate_rule
from management.deploys import Busy, Deployer
from management.http import ApiError, json_response, read_json

DEFAULTS = {"ready_timeout": 60.0, "drain_timeout": 30.0, "warmup": 10.0}
MINIMUM = {"ready_timeout": 0.001, "drain_timeout": 0.001, "warmup": 0.0}

RULES = [
    Rule("/api/v1/hosts/<host>/deploy", endpoint="deploy", methods=["POST"]),
    Rule("/api/v1/hosts/<host>/rollback", endpoint="rollback", methods=["POST"]),
    Rule("/api/v1/deploys", endpoint="list_deploys", methods=["GET"]),
    Rule("/api/v1/deploys/<deploy_id>", endpoint="get_deploy", methods=["GET"]),
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


def current_rule(app: Any, key: str) -> dict[str, Any]:
    """The host's rule as stored now (`Store.host_rule`: not the whole table)."""
    rule = app.store.host_rule(key).rule
    if rule is None:
        raise ApiError(404, "not_found", f"no rule for host {key!r}")
    return dict(rule)


def start(deployer: Deployer, key: str, rule: dict[str, Any], to: list[Any],
          settings: dict[str, float], kind: str) -> dict[str, Any]:
    try:
        return deployer.start(key, rule, to, settings, kind)
    except Busy as exc:
        raise ApiError(409, "deploy_in_progress",
                       f"host {key!r} has a deploy running ({exc.deploy_id}); wait for it "
                       f"to end (GET /api/v1/deploys/{exc.deploy_id})",
                       [f"deploy: {exc.deploy_id}"]) from None


def deploy(app: Any, key: str, body: Any) -> dict[str, Any]:
    to, settings = parse_deploy(body)
    app.check_writable()
    return start(app.deployer, key, current_rule(app, key), to, settings, "deploy")


def rollback(app: Any, key: str, body: Any) -> dict[str, Any]:
    _, settings = parse_deploy(body, need_backends=False)
    app.check_writable()
    rule = current_rule(app, key)
    last = next((r for r in app.deployer.records.deploys()
                 if r.get("host") == key and r.get("state") == "done"), None)
    if last is None or not last.get("from"):
        raise ApiError(409, "nothing_to_roll_back",
                       f"host {key!r} has no finished deploy from other backends to go back "
                       f"to (the deploy records keep the recent ones: GET /api/v1/deploys)")
    return start(app.deployer, key, rule, list(last["from"]), settings, "rollback")


def find(app: Any, deploy_id: str) -> dict[str, Any]:
    record = app.deployer.records.deploy(deploy_id)
    if record is None:
        raise ApiError(404, "not_found", f"no deploy {deploy_id!r} (only the recent ones "
                       f"are kept)")
    return record


class DeployRoutes:
    """The `on_<endpoint>` methods of the deploy routes (a part of `ManagementApp`)."""

    deployer: Deployer

    def on_deploy(self, request: Request, host: str) -> Response:
        record = deploy(self, normalize_host(host), read_json(request))
        return json_response({"deploy": record}, status=202)

    def on_rollback(self, request: Request, host: str) -> Response:
        body = read_json(request) if request.content_length else None
        record = rollback(self, normalize_host(host), body)
        return json_response({"deploy": record}, status=202)

    def on_list_deploys(self, request: Request) -> Response:
        return json_response({"deploys": self.deployer.records.deploys()})

    def on_get_deploy(self, request: Request, deploy_id: str) -> Response:
        return json_response({"deploy": find(self, deploy_id)})
