"""The management API (SPEC §5): a werkzeug WSGI app over a store and a runtime.

Invariants:
* Rules are validated by `balancer.rules` (the data plane's own validator)
  before any write; a rejected request never changes the table.
* Host keys are normalised (`normalize_host`) here, once, before the store.
* Errors become responses in one place (`ManagementApp.dispatch`):
  ``{"error": CODE, "message": TEXT, "details": [...]}``.
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

from balancer.rules import normalize_host, validate_host, validate_rule, validate_table
from balancer.stores import CorruptStore, Store, StoreUnavailable, VersionConflict, open_store
from management import dashboard_page, edits
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
from management.runtime import Runtime, StaticRuntime
from management.stats_view import host_stats, stats_view

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
    Rule("/api/v1/info", endpoint="info", methods=["GET"]),
], strict_slashes=False, merge_slashes=False)


def create_app(store: Store | None = None, runtime: Runtime | None = None,
               token: str | None = None, settings: Any = None) -> ManagementApp:
    """The management WSGI app.

    Without a store, one is opened from `settings` (or, with no settings, from
    `balancer.settings.load_settings()`: ``BALANCER_STORE_URL``,
    ``BALANCER_CONFIG``...). Without a runtime, a `StaticRuntime` (no data
    plane) is used. `token` defaults to ``settings.management.token``.
    """
    if store is None:
        if settings is None:
            from balancer.settings import load_settings

            settings = load_settings()
        store = open_store(settings.store.url, settings.store.namespace,
                           settings.store.resync_interval)
    if token is None and settings is not None:
        token = settings.management.token or None
    return ManagementApp(store, runtime or StaticRuntime(store), token)


class ManagementApp:
    """WSGI callable: routes requests of SPEC §5 to `on_<endpoint>` methods."""

    def __init__(self, store: Store, runtime: Runtime, token: str | None = None) -> None:
        self.store = store
        self.runtime = runtime
        self.token = token or None
        self.metrics = Metrics(runtime.stats)

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
        except (StoreUnavailable, CorruptStore, VersionConflict) as exc:
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
        data = self.store.load()
        return json_response({"version": data.version, "hosts": data.hosts},
                             headers=version_headers(data.version))

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
        return _written(self.store.replace(hosts, condition))

    def on_get_host(self, request: Request, host: str) -> Response:
        key = normalize_host(host)
        data = self.store.load()
        if key not in data.hosts:
            raise _no_host(key)
        return json_response({"host": key, "rule": data.hosts[key], "version": data.version},
                             headers=version_headers(data.version))

    def on_put_host(self, request: Request, host: str) -> Response:
        condition = if_match(request)
        rule = read_json(request)
        problems = validate_host(host) + validate_rule(rule)
        if problems:
            raise _invalid(problems)
        return _written(self.store.put_host(normalize_host(host), rule, condition))

    def on_delete_host(self, request: Request, host: str) -> Response:
        condition = if_match(request)
        key = normalize_host(host)
        try:
            return _written(self.store.delete_host(key, condition))
        except KeyError:
            raise _no_host(key) from None

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
                return _written(self.store.put_host(key, rule, data.version))
            except VersionConflict:
                if condition is not None:
                    raise
        raise StoreUnavailable(f"the table kept changing during {EDIT_ATTEMPTS} attempts; "
                               f"try again")

    # data plane ------------------------------------------------------------
    def on_stats(self, request: Request) -> Response:
        return json_response(stats_view(self.runtime.stats()))

    def on_host_stats(self, request: Request, host: str) -> Response:
        key = normalize_host(host)
        found = self.runtime.stats().get("hosts", {}).get(key)
        if found is None and key not in self.store.load().hosts:
            raise ApiError(404, "not_found", f"no statistics for host {key!r}")
        return json_response({"host": key, **host_stats(found or {})})

    def on_reload(self, request: Request) -> Response:
        return _written(self.runtime.reload())

    def on_info(self, request: Request) -> Response:
        return json_response(self.runtime.info())

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

    # dashboard -------------------------------------------------------------
    def on_index(self, request: Request) -> Response:
        index = STATIC_DIR / "index.html"
        if not index.is_file():
            return Response(FALLBACK_INDEX, content_type="text/html; charset=utf-8")
        state = None if self.token else dashboard_page.initial_state(self.store, self.runtime)
        response = Response(dashboard_page.embed(index.read_text(), state),
                            content_type="text/html; charset=utf-8")
        response.headers["Cache-Control"] = "no-store"
        return response

    def on_static(self, request: Request, name: str) -> Response:
        return file_response(STATIC_DIR, name)


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith("/static/")


def _written(version: int) -> Response:
    return json_response({"version": version}, headers=version_headers(version))


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
    if isinstance(exc, CorruptStore):
        return ApiError(503, "store_corrupt", str(exc))
    return ApiError(503, "store_unavailable", str(exc))
