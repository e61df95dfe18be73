"""The management API (SPEC §5): a werkzeug WSGI app over a store and a runtime.

Invariants:
* Rules are validated by `balancer.rules` (the data plane's own validator)
  before any write; a rejected request never changes the table.
* Host keys are normalised (`normalize_host`) here, once, before the store.
* Errors become responses in one place (`ManagementApp.dispatch`):
  ``{"error": CODE, "message": TEXT, "details": [...]}``.
* A write answers once every worker of this balancer serves it (the runtime's
  `publish`): 200 ``{"version": N}``, or 202 with ``"applied": false`` and the
  lagging workers after ``[management] apply_timeout``.
* A store that lost its table (the mirror's loss guard, or the store behind
  the highest version known: `Store.floor`) refuses one-host writes with 409
  `store_lost` naming `balancerctl restore`; a whole-table PUT or a restore
  writes above every version known. Reads fall back on the served table, with
  a ``store_problem`` field, while the store is down or lost.
* A deploy's writes (`management/deploys.py`) go through `write_rule`: the
  same loss guard and read-your-writes as every one-host write.
* With a token, every route needs ``Authorization: Bearer TOKEN`` except
  ``/healthz`` and the dashboard's static shell (``/``, ``/static/*``), which
  carries no data: the dashboard sends the token with each API call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from balancer.rules import (
    host_rule_problems,
    normalize_host,
    validate_host,
    validate_rule,
    validate_table,
)
from balancer.stores import (
    CorruptStore,
    Store,
    StoreLost,
    StoreUnavailable,
    TableData,
    VersionConflict,
    open_store,
)
from balancer.stores.snapshot import HOW_TO_FIX
from management import acme_api, certs_api, dashboard_page, deploys_api, diagnosis, edits
from management.deploys import Deployer
from management.guard import Guard, guard_for
from management.history import History
from management.http import (
    ApiError,
    check_token,
    error_response,
    file_response,
    if_match,
    json_response,
    read_json,
    version_headers,
)
from management.metrics import Metrics
from management.mirror import Mirror
from management.runtime import Runtime, StaticRuntime
from management.stats_view import host_stats, stats_select, stats_view

log = logging.getLogger("balancer.management")

STATIC_DIR = Path(__file__).parent / "static"
PUBLIC_PATHS = ("/healthz", "/")
EDIT_ATTEMPTS = 10  # read-modify-write retries for backend edits without If-Match

FALLBACK_INDEX = """<!doctype html>
<html><head><meta charset="utf-8"><title>balancer</title></head>
<body><h1>balancer management</h1>
<p>The dashboard is not installed. The JSON API is at
<a href="/api/v1/hosts">/api/v1/hosts</a>, <a href="/api/v1/stats">/api/v1/stats</a>,
<a href="/api/v1/info">/api/v1/info</a>; metrics at <a href="/metrics">/metrics</a>.</p>
</body></html>
"""

URL_MAP = Map([
    Rule("/", endpoint="index", methods=["GET"]),
    Rule("/static/<path:name>", endpoint="static", methods=["GET"]),
    Rule("/healthz", endpoint="healthz", methods=["GET"]),
    Rule("/readyz", endpoint="readyz", methods=["GET"]),
    Rule("/metrics", endpoint="metrics", methods=["GET"]),
    Rule("/api/v1/hosts", endpoint="list_hosts", methods=["GET"]),
    Rule("/api/v1/hosts", endpoint="replace_hosts", methods=["PUT"]),
    Rule("/api/v1/hosts/<host>", endpoint="get_host", methods=["GET"]),
    Rule("/api/v1/hosts/<host>", endpoint="put_host", methods=["PUT"]),
    Rule("/api/v1/hosts/<host>", endpoint="delete_host", methods=["DELETE"]),
    Rule("/api/v1/hosts/<host>/backends", endpoint="add_backend", methods=["POST"]),
    Rule("/api/v1/hosts/<host>/backends/<address>", endpoint="remove_backend",
         methods=["DELETE"]),
    Rule("/api/v1/stats", endpoint="stats", methods=["GET"]),
    Rule("/api/v1/stats/<host>", endpoint="host_stats", methods=["GET"]),
    Rule("/api/v1/reload", endpoint="reload", methods=["POST"]),
    Rule("/api/v1/restore", endpoint="restore", methods=["POST"]),
    Rule("/api/v1/info", endpoint="info", methods=["GET"]),
    *deploys_api.RULES,
    Rule("/api/v1/top", endpoint="top", methods=["GET"]),
    Rule("/api/v1/inflight", endpoint="inflight", methods=["GET"]),
    Rule("/api/v1/history", endpoint="history", methods=["GET"]),
    *certs_api.RULES,
    *acme_api.RULES,
], strict_slashes=False, merge_slashes=False)


def create_app(store: Store | None = None, runtime: Runtime | None = None,
               token: str | None = None, settings: Any = None,
               mirror: Mirror | None = None, history: History | None = None,
               issuer: Any = None) -> ManagementApp | Guard:
    """The management WSGI app.

    Without a store, one is opened from `settings` (or, with no settings, from
    `balancer.settings.load_settings()`: ``BALANCER_STORE_URL``,
    ``BALANCER_CONFIG``...), and the app is served by another WSGI server:
    it comes behind the browser rules of SPEC §5 (`management.guard`, with
    ``management.listen`` as its address). Without a runtime, a
    `StaticRuntime` (no data plane) is used. `token` defaults to
    ``settings.management.token``. `issuer` is the management process's ACME
    issuer (`management.acme_issuer`); without one, ACME requests are only noted
    in the store, for the issuer of a running balancer.
    """
    standalone = store is None
    if store is None:
        if settings is None:
            from balancer.settings import load_settings

            settings = load_settings()
        store = open_store(settings.store.url, settings.store.namespace,
                           settings.store.resync_interval)
    if token is None and settings is not None:
        token = settings.management.token or None
    app = ManagementApp(store, runtime or StaticRuntime(store), token, mirror, history, issuer)
    return guard_for(app, settings) if standalone else app


class ManagementApp:
    """WSGI callable: routes requests of SPEC §5 to `on_<endpoint>` methods."""

    def __init__(self, store: Store, runtime: Runtime, token: str | None = None,
                 mirror: Mirror | None = None, history: History | None = None,
                 issuer: Any = None) -> None:
        self.store = store
        self.issuer = issuer  # ACME (management/acme_issuer.py), in the management process
        self.runtime = runtime
        self.token = token or None
        self.mirror = mirror or Mirror(store)  # not started: only this app's writes
        self.metrics = Metrics(runtime.stats, lambda: certs_api.expiries(self.store))
        self.deployer = Deployer(store, runtime, self.write_rule)
        self.history = history or History()  # sampled by the management process

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        return self.dispatch(Request(environ))(environ, start_response)

    def dispatch(self, request: Request) -> Response:
        """The response to one request; every error is turned into JSON here."""
        try:
            if not _is_public(request.path):
                check_token(request, self.token)
            endpoint, args = URL_MAP.bind_to_environ(request.environ).match()
            return getattr(self, f"on_{endpoint}")(request, **args)
        except ApiError as exc:
            return error_response(exc)
        except (StoreUnavailable, CorruptStore, VersionConflict, StoreLost) as exc:
            return error_response(_store_error(exc))
        except MethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.valid_methods or ()))
            return error_response(ApiError(405, "method_not_allowed",
                                           f"{request.method} is not allowed on {request.path}",
                                           headers={"Allow": allowed}))
        except NotFound:
            return error_response(ApiError(404, "not_found", f"no route {request.path}"))
        except HTTPException as exc:
            return error_response(ApiError(exc.code or 400, "bad_request", exc.description or ""))
        except Exception:
            log.exception("management %s %s failed", request.method, request.path)
            return error_response(ApiError(500, "internal_error",
                                           "internal error; see the balancer log"))

    # hosts -----------------------------------------------------------------
    def on_list_hosts(self, request: Request) -> Response:
        data, problem = self._readable()
        body: dict[str, Any] = {"version": data.version, "hosts": data.hosts}
        if problem:
            body["store_problem"] = problem
        return json_response(body, headers=version_headers(data.version))

    def _readable(self) -> tuple[TableData, str | None]:
        """The store's table; the table served (and why) when the store lost its table
        or cannot be read but this process knows the served one."""
        served = self.mirror.table
        if self.mirror.problem and served is not None:
            return served, self.mirror.problem
        try:
            return self.store.load(), None
        except (StoreUnavailable, CorruptStore) as exc:
            if served is None:
                raise
            return served, f"{exc}; showing the table this balancer serves (version " \
                f"{served.version})"

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
        body = {"host": key, "rule": data.hosts[key], "version": data.version}
        if problem:
            body["store_problem"] = problem
        return json_response(body, headers=version_headers(data.version))

    def on_put_host(self, request: Request, host: str) -> Response:
        condition = if_match(request)
        rule = read_json(request)
        problems = validate_host(host) + validate_rule(rule) + host_rule_problems(host, rule)
        if problems:
            raise _invalid(problems)
        key = normalize_host(host)
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
                               lambda key, rule: edits.with_backend(rule, address, weight))

    def on_remove_backend(self, request: Request, host: str, address: str) -> Response:
        condition = if_match(request)
        return self._edit_rule(normalize_host(host), condition,
                               lambda key, rule: edits.without_backend(key, rule, address))

    def _edit_rule(self, key: str, condition: int | None,
                   edit: Callable[[str, dict[str, Any]], dict[str, Any]]) -> Response:
        """Read-modify-write one proxy rule, retried while other writers race us."""
        self._check_not_lost()
        for _ in range(EDIT_ATTEMPTS):
            data = self.store.load()
            if condition is not None and condition != data.version:
                raise VersionConflict(data.version)
            if key not in data.hosts:
                raise _no_host(key)
            edits.require_proxy(key, data.hosts[key])
            rule = edit(key, dict(data.hosts[key]))
            problems = validate_rule(rule)
            if problems:
                raise _invalid(problems)
            try:
                return self._after_write(self.store.put_host(key, rule, data.version),
                                         {key: rule})
            except VersionConflict:
                if condition is not None:
                    raise
        raise StoreUnavailable(f"the table kept changing during {EDIT_ATTEMPTS} attempts; "
                               f"try again")

    def write_rule(self, key: str, rule: dict[str, Any], if_version: int) -> int:
        """A deploy's write of one host's rule, answered once every worker serves it
        (`VersionConflict` when the table moved past `if_version`)."""
        self._check_not_lost()
        version = self.store.put_host(key, rule, if_version)
        self.mirror.note_write(version, {key: rule})
        publish = getattr(self.runtime, "publish", None)
        lagging = publish(version, {key: rule}) if publish else []
        if lagging:
            log.warning("deploy of %s: version %d not served yet by %s", key, version, lagging)
        return version

    def check_writable(self) -> None:
        """409 `store_lost` while the store lost its table (as one-host writes)."""
        self._check_not_lost()

    # deploys (management/deploys.py) ---------------------------------------
    def on_deploy(self, request: Request, host: str) -> Response:
        record = deploys_api.deploy(self, normalize_host(host), read_json(request))
        return json_response({"deploy": record}, status=202)

    def on_rollback(self, request: Request, host: str) -> Response:
        body = read_json(request) if request.content_length else None
        record = deploys_api.rollback(self, normalize_host(host), body)
        return json_response({"deploy": record}, status=202)

    def on_list_deploys(self, request: Request) -> Response:
        return json_response({"deploys": self.deployer.records.deploys()})

    def on_get_deploy(self, request: Request, deploy_id: str) -> Response:
        return json_response({"deploy": deploys_api.find(self, deploy_id)})

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
        version = self.store.replace(served.hosts)
        log.warning("restore: wrote the served table (version %d, %d hosts) back to store %s "
                    "as version %d", served.version, len(served.hosts), self.store.display_url,
                    version)
        self.mirror.note_write(version, None, served.hosts)
        return self._published(version, None, {"restored_from": served.version,
                                               "hosts": len(served.hosts)})

    # data plane ------------------------------------------------------------
    def on_stats(self, request: Request) -> Response:
        return json_response(stats_view(self.runtime.stats(stats_select(request.args))))

    def on_host_stats(self, request: Request, host: str) -> Response:
        key = normalize_host(host)
        found = self.runtime.stats({"hosts": [key]}).get("hosts", {}).get(key)
        if found is None and key not in self.store.load().hosts:
            raise ApiError(404, "not_found", f"no statistics for host {key!r}")
        return json_response({"host": key, **host_stats(found or {})})

    def on_reload(self, request: Request) -> Response:
        version = self.runtime.reload()
        return json_response({"version": version}, headers=version_headers(version))

    def on_info(self, request: Request) -> Response:
        info = self.runtime.info()
        store = info.setdefault("store", {})
        store["problem"] = self.mirror.problem or store.get("problem")
        return json_response(info)

    def on_top(self, request: Request) -> Response:
        return json_response(diagnosis.top(self.runtime, request.args))

    def on_inflight(self, request: Request) -> Response:
        return json_response(diagnosis.inflight(self.runtime, request.args))

    def on_history(self, request: Request) -> Response:
        return json_response(diagnosis.history(self.history, request.args))

    def on_healthz(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    def on_readyz(self, request: Request) -> Response:
        reasons = []
        if not self.runtime.is_ready():
            reasons.append("no routing table loaded yet")
        if not self.store.is_reachable():
            problem = self.store.last_error()
            reasons.append(f"store unreachable: {problem}" if problem else "store unreachable")
        if reasons:
            return json_response({"ready": False, "reasons": reasons}, status=503)
        return json_response({"ready": True, "reasons": []})

    def on_metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(), content_type=Metrics.content_type)

    # certificates (management/certs_api.py) --------------------------------
    def on_list_certs(self, request: Request) -> Response:
        acme = acme_api.host_states(self.store, self._readable()[0].hosts)
        certs = [{**c, "acme": acme[c["host"]]} if c["host"] in acme else c
                 for c in certs_api.list_certs(self.store)]
        return json_response({"certs": certs, "acme": acme})

    def on_put_cert(self, request: Request, host: str) -> Response:
        return json_response({"cert": certs_api.put_cert(self.store, host, read_json(request))})

    def on_delete_cert(self, request: Request, host: str) -> Response:
        return json_response({"deleted": certs_api.delete_cert(self.store, host)})

    # ACME (management/acme_api.py) -------------------------------------------
    def on_acme(self, request: Request) -> Response:
        hosts = self._readable()[0].hosts
        return json_response(acme_api.acme_view(self.store, hosts, self.issuer))

    def on_issue_cert(self, request: Request, host: str) -> Response:
        hosts = self._readable()[0].hosts
        return json_response(acme_api.request_issue(self.store, hosts, host, self.issuer),
                             status=202)

    # dashboard -------------------------------------------------------------
    def on_index(self, request: Request) -> Response:
        index = STATIC_DIR / "index.html"
        if not index.is_file():
            return Response(FALLBACK_INDEX, content_type="text/html; charset=utf-8")
        state = None if self.token else dashboard_page.initial_state(self.store, self.runtime,
                                                                        self.history)
        response = Response(dashboard_page.embed(index.read_text(), state),
                            content_type="text/html; charset=utf-8")
        response.headers["Cache-Control"] = "no-store"
        return response

    def on_static(self, request: Request, name: str) -> Response:
        return file_response(STATIC_DIR, name)


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith("/static/")


def _invalid(problems: list[str]) -> ApiError:
    n = len(problems)
    return ApiError(400, "invalid_rule", f"the rule is invalid ({n} problem"
                    f"{'s' if n != 1 else ''})", problems)


def _no_host(key: str) -> ApiError:
    return ApiError(404, "not_found", f"no rule for host {key!r}")


def _store_error(exc: Exception) -> ApiError:
    if isinstance(exc, VersionConflict):
        return ApiError(412, "version_conflict", f"{exc}; re-read it and retry",
                        [f"current version: {exc.current}"], version_headers(exc.current))
    if isinstance(exc, StoreLost):
        return ApiError(409, "store_lost", str(exc))
    if isinstance(exc, CorruptStore):
        return ApiError(503, "store_corrupt", f"{exc}; fix the store, or {HOW_TO_FIX}")
    return ApiError(503, "store_unavailable", str(exc))
