"""The management API (SPEC §5): a werkzeug WSGI app over a store and a runtime.

The routes are methods ``on_<endpoint>`` of `ManagementApp`, grouped by concern
in the classes it is made of: `management.hosts_api` (the table),
`management.status_api` (statistics, info, health, metrics),
`management.deploys_api`, `management.dashboard_page` and, here, the
certificates and ACME (`management.certs_api`, `management.acme_api`).
`URL_MAP` names every route.

Invariants:
* Errors become responses in one place (`ManagementApp.dispatch`):
  ``{"error": CODE, "message": TEXT, "details": [...]}``.
* Writes are validated before the store and answer once every worker serves
  them (`management.hosts_api`).
* With a token, every route needs ``Authorization: Bearer TOKEN`` except
  ``/healthz`` and the dashboard's static shell (``/``, ``/static/*``), which
  carries no data: the dashboard sends the token with each API call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map
from werkzeug.wrappers import Request, Response

from balancer.backend_tls import BackendTLS
from balancer.descriptors import exhaustion, shortage
from balancer.restarts import Restarts
from balancer.stores import (
    CorruptStore,
    Store,
    StoreFull,
    StoreLost,
    StoreNotReplicated,
    StoreUnavailable,
    VersionConflict,
    open_store,
)
from balancer.stores.certs import CertsCorrupt, CertsLost
from balancer.stores.snapshot import HOW_TO_FIX
from management import acme_api, certs_api, deploys_api
from management.certs_watch import CertsWatch
from management.conditional import create_only
from management.dashboard_page import DashboardRoutes
from management.deploys import Deployer
from management.deploys_api import DeployRoutes
from management.guard import Guard, guard_for
from management.history import History
from management.hosts_api import HostRoutes
from management.http import (
    ApiError,
    Route,
    check_query,
    check_token,
    error_response,
    json_response,
    path_arguments,
    read_json,
    route_path,
    version_headers,
)
from management.mirror import Mirror
from management.runtime import Runtime, StaticRuntime
from management.status_api import StatusRoutes
from management.table_reads import TableReads

log = logging.getLogger("balancer.management")

PUBLIC_PATHS = ("/healthz", "/")

URL_MAP = Map([
    Route("/", endpoint="index", methods=["GET"]),
    Route("/static/<path:name>", endpoint="static", methods=["GET"]),
    Route("/healthz", endpoint="healthz", methods=["GET"]),
    Route("/readyz", endpoint="readyz", methods=["GET"]),
    Route("/metrics", endpoint="metrics", methods=["GET"]),
    Route("/api/v1/hosts", endpoint="list_hosts", methods=["GET"]),
    Route("/api/v1/hosts", endpoint="replace_hosts", methods=["PUT"]),
    Route("/api/v1/hosts/<host>", endpoint="get_host", methods=["GET"]),
    Route("/api/v1/hosts/<host>", endpoint="put_host", methods=["PUT"]),
    Route("/api/v1/hosts/<host>", endpoint="delete_host", methods=["DELETE"]),
    Route("/api/v1/hosts/<host>/backends", endpoint="add_backend", methods=["POST"]),
    Route("/api/v1/hosts/<host>/backends/<path:address>", endpoint="remove_backend",
         methods=["DELETE"]),
    Route("/api/v1/stats", endpoint="stats", methods=["GET"]),
    Route("/api/v1/stats/<host>", endpoint="host_stats", methods=["GET"]),
    Route("/api/v1/reload", endpoint="reload", methods=["POST"]),
    Route("/api/v1/restore", endpoint="restore", methods=["POST"]),
    Route("/api/v1/info", endpoint="info", methods=["GET"]),
    *deploys_api.RULES,
    Route("/api/v1/top", endpoint="top", methods=["GET"]),
    Route("/api/v1/inflight", endpoint="inflight", methods=["GET"]),
    Route("/api/v1/history", endpoint="history", methods=["GET"]),
    *certs_api.RULES,
    *acme_api.RULES,
], strict_slashes=False, merge_slashes=False)


def create_app(store: Store | None = None, runtime: Runtime | None = None,
               token: str | None = None, settings: Any = None,
               mirror: Mirror | None = None, history: History | None = None,
               issuer: Any = None, certs_watch: CertsWatch | None = None
               ) -> ManagementApp | Guard:
    """The management WSGI app.

    Without a store, one is opened from `settings` (or, with no settings, from
    `balancer.settings.load_settings()`: ``BALANCER_STORE_URL``,
    ``BALANCER_CONFIG``...), and the app is served by another WSGI server:
    it comes behind the browser rules of SPEC §5 (`management.guard`, with
    ``management.listen`` as its address). Without a runtime, a
    `StaticRuntime` (no data plane) is used. `token` defaults to
    ``settings.management.token``. `issuer` is the management process's ACME
    issuer (`management.acme_issuer`); without one, ACME requests are only noted
    in the store, for the issuer of a running balancer. `certs_watch` is the
    management process's watch on the store's certificates (`management.certs_watch`).
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
    app = ManagementApp(store, runtime or StaticRuntime(store), token, mirror, history, issuer,
                        settings.tls.backend_ca_bundle if settings is not None else "",
                        certs_watch)
    return guard_for(app, settings) if standalone else app


class ManagementApp(HostRoutes, StatusRoutes, DeployRoutes, DashboardRoutes):
    """WSGI callable: routes requests of SPEC §5 to `on_<endpoint>` methods."""

    def __init__(self, store: Store, runtime: Runtime, token: str | None = None,
                 mirror: Mirror | None = None, history: History | None = None,
                 issuer: Any = None, backend_ca_bundle: str = "",
                 certs_watch: CertsWatch | None = None) -> None:
        self.store = store
        self.certs_watch = certs_watch or CertsWatch(store)  # not started: reads on demand
        self.issuer = issuer  # ACME (management/acme_issuer.py), in the management process
        self.runtime = runtime
        self.token = token or None
        self.mirror = mirror or Mirror(store)  # not started: only this app's writes
        self.table_reads = TableReads(store, self.mirror)  # what reads answer, encoded once
        self.metrics = None  # made at the first scrape (`StatusRoutes.exporter`)
        self.deployer = Deployer(store, runtime, self.write_rule,
                                 BackendTLS(backend_ca_bundle),  # deploys probe https:// too
                                 lambda: self.mirror.problem)
        self.history = history or History()  # sampled by the management process
        # requests that ran out of descriptors or memory: one line an episode (`failed`)
        self.exhausted = Restarts("management API", log, quiet=False, loop="a request",
                                  then="answering 503 resources_exhausted")

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        return self.dispatch(Request(environ))(environ, start_response)

    def unauthorized(self, environ: dict[str, Any]) -> ApiError | None:
        """The 401 that refuses a request from its head alone (before its body is
        read: `management.server`), or None."""
        if _is_public(route_path(environ)):
            return None
        try:
            check_token(Request(environ), self.token)
        except ApiError as exc:
            return exc
        return None

    def dispatch(self, request: Request) -> Response:
        """The response to one request; every error is turned into JSON here."""
        path = route_path(request.environ)  # (encoded: `management.http`'s invariant)
        try:
            if not _is_public(path):
                check_token(request, self.token)
            check_query(request)
            endpoint, args = URL_MAP.bind_to_environ(request.environ).match(path)
            if request.method not in ("GET", "HEAD"):  # a write: 400 unless honoured
                create_only(request, creates=endpoint == "put_host")
            return getattr(self, f"on_{endpoint}")(request, **path_arguments(args))
        except ApiError as exc:
            return error_response(exc)
        except (StoreUnavailable, CorruptStore, VersionConflict, StoreLost, CertsCorrupt,
                CertsLost) as exc:
            return error_response(_store_error(exc))
        except MethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.valid_methods or ()))
            return error_response(ApiError(405, "method_not_allowed",
                                           f"{request.method} is not allowed on {path}",
                                           headers={"Allow": allowed}))
        except NotFound:
            return error_response(ApiError(404, "not_found", f"no route {path}"))
        except HTTPException as exc:
            return error_response(ApiError(exc.code or 400, "bad_request",
                                           "the request could not be read",
                                           [exc.description or exc.name]))
        except Exception as exc:
            return self.failed(request, path, exc)

    def failed(self, request: Request, path: str, exc: Exception) -> Response:
        """500 `internal_error` for a bug, its traceback logged; 503
        `resources_exhausted` when `exc` is running out of descriptors or memory
        (EMFILE under a limit lowered by `prlimit`, ENFILE, ENOMEM, `MemoryError`:
        `exhaustion`), one line an episode as the background loops (`Restarts`).
        Bugs: each such request logged a traceback asking for a bug report
        (`MemoryError` until 2026-12-07's night); a bug raised while handling
        EMFILE was answered 503, its traceback never logged."""
        exhausted = exhaustion(exc)
        if exhausted is None:
            log.error("management %s %s failed", request.method, path, exc_info=exc)
            return error_response(ApiError(500, "internal_error",
                                           "internal error; see the balancer log"))
        self.exhausted.failed(exhausted)
        return error_response(ApiError(
            503, "resources_exhausted", "the management process is out of descriptors or "
            f"memory ({shortage(exhausted)}); try again once they free up"))

    # certificates (management/certs_api.py) --------------------------------
    def on_list_certs(self, request: Request) -> Response:
        acme = acme_api.host_states(self.store, self._readable()[0].hosts)
        listed, problem = certs_api.list_certs(self.store)
        certs = [{**c, "acme": acme[c["host"]]} if c["host"] in acme else c for c in listed]
        body: dict[str, Any] = {"certs": certs, "acme": acme}
        if problem is not None:
            body["problem"] = problem
        return json_response(body)

    def on_restore_certs(self, request: Request) -> Response:
        restored = certs_api.restore_certs(self.store, self.certs_watch.damage())
        certs_api.tell_workers(self.runtime)
        self.certs_watch.look()
        return json_response({"restored": restored})

    def on_put_cert(self, request: Request, host: str) -> Response:
        stored = certs_api.put_cert(self.store, host, read_json(request))
        certs_api.tell_workers(self.runtime)  # served when the answer arrives
        return json_response({"cert": stored})

    def on_delete_cert(self, request: Request, host: str) -> Response:
        deleted = certs_api.delete_cert(self.store, host)
        certs_api.tell_workers(self.runtime)
        return json_response({"deleted": deleted})

    # ACME (management/acme_api.py) -------------------------------------------
    def on_acme(self, request: Request) -> Response:
        hosts = self._readable()[0].hosts
        return json_response(acme_api.acme_view(self.store, hosts, self.issuer))

    def acme_figures(self) -> dict[str, Any]:
        """ACME's part of ``/metrics`` (`acme_api.figures`), read at scrape time."""
        return acme_api.figures(self.store, self._readable()[0].hosts, self.issuer,
                                time.time())

    def on_issue_cert(self, request: Request, host: str) -> Response:
        hosts = self._readable()[0].hosts
        return json_response(acme_api.request_issue(self.store, hosts, host, self.issuer),
                             status=202)


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith("/static/")


def _store_error(exc: Exception) -> ApiError:
    if isinstance(exc, CertsCorrupt):
        return ApiError(503, "certs_corrupt", str(exc))
    if isinstance(exc, CertsLost):
        return ApiError(503, "certs_lost", str(exc))
    if isinstance(exc, VersionConflict):
        return ApiError(412, "version_conflict", f"{exc}; re-read it and retry",
                        [f"current version: {exc.current}"], version_headers(exc.current))
    if isinstance(exc, StoreLost):
        return ApiError(409, "store_lost", str(exc))
    if isinstance(exc, CorruptStore):
        return ApiError(503, "store_corrupt", f"{exc}; fix the store, or {HOW_TO_FIX}")
    if isinstance(exc, StoreFull):
        return ApiError(507, "store_full", f"{exc}; nothing was written")
    if isinstance(exc, StoreNotReplicated):
        return ApiError(503, "store_not_replicated", str(exc))
    return ApiError(503, "store_unavailable", str(exc))
