"""`balancer serve` in one process: bind, load the table, serve, stop on a signal.

Steps: monkey-patch → open the store → bind every listener (a bind failure
exits non-zero naming the address) → load the table → serve the proxy and the
management API → wait for a signal → drain gracefully.
"""

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from balancer.addr import Address  # noqa: E402
from balancer.server import Worker, bind  # noqa: E402
from balancer.settings import Settings  # noqa: E402

log = logging.getLogger("balancer")


class WorkerRuntime:
    """The management app's view of the live data plane of this process."""

    def __init__(self, worker: Worker, store: Any, workers: int = 1) -> None:
        self.worker = worker
        self.store = store
        self.workers = workers

    def stats(self) -> dict:
        snapshot = self.worker.stats.snapshot()
        snapshot["store_up"] = int(self.store.is_reachable())
        return snapshot

    def reload(self) -> int:
        return self.worker.reload()

    def is_ready(self) -> bool:
        return self.worker.loaded

    def info(self) -> dict:
        stats = self.worker.stats
        return {"workers": self.workers,
                "store": {"kind": self.store.kind, "url": redact(self.worker.settings.store.url),
                          "reachable": self.store.is_reachable(),
                          "version": self.worker.holder.table.version,
                          "last_reload": stats.last_reload}}


def redact(url: str) -> str:
    """A store URL without its password."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    return f"{scheme}://***@{host}"


def bind_all(addresses: list[tuple[Address, bool]]) -> list[tuple[Any, bool]]:
    """Bind every listener or exit naming the one that failed."""
    bound = []
    for address, trusted in addresses:
        try:
            bound.append((bind(address), trusted))
        except OSError as exc:
            print(f"balancer: cannot listen on {address}: {exc.strerror or exc}",
                  file=sys.stderr)
            raise SystemExit(1) from None
    return bound


def bound_name(sock: Any) -> str:
    """The address a listening socket is bound to, as `host:port` / `[v6]:port`."""
    host, port = sock.getsockname()[:2]
    return str(Address(host, port))


def listener_addresses(settings: Settings) -> list[tuple[Address, bool]]:
    server = settings.server
    return [(a, False) for a in server.listen] + [(a, True) for a in server.internal_listen]


def initial_load(worker: Worker) -> None:
    """Load the table once; a store problem is reported and serving starts anyway."""
    from management.stores.base import StoreError

    try:
        worker.reload()
    except StoreError as exc:
        log.error("store %s: %s; serving the no-hosts page until it recovers",
                  redact(worker.settings.store.url), exc)


def serve(settings: Settings) -> int:
    """Run one worker with its management API until SIGTERM/SIGINT."""
    logging.basicConfig(level=settings.log.level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from management.app import create_app
    from management.stores import open_store

    try:
        store = open_store(settings.store.url, settings.store.namespace,
                           settings.store.resync_interval)
    except ValueError as exc:
        print(f"balancer: store.url: {exc}", file=sys.stderr)
        return 2
    sockets = bind_all(listener_addresses(settings))
    management = bind_all([(settings.management.listen, False)])[0][0]
    worker = Worker(settings, store)
    initial_load(worker)
    worker.listen(sockets)
    worker.start()
    app = create_app(store=store, runtime=WorkerRuntime(worker, store),
                     token=settings.management.token or None, settings=settings)
    api = WSGIServer(management, app, log=None, error_log=log)
    api.start()
    for sock, trusted in sockets:
        log.info("listening on %s for %s", bound_name(sock), "internal" if trusted else "proxy")
    log.info("listening on %s for management", bound_name(management))
    log.info("store %s, routing version %d", redact(settings.store.url),
             worker.holder.table.version)
    wait_for_stop(worker)
    api.stop(timeout=1)
    worker.stop(settings.timeouts.graceful)
    return 0


def wait_for_stop(worker: Worker) -> None:
    """Block until SIGTERM/SIGINT; SIGUSR1 reopens the access log meanwhile."""
    stop = Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    gevent.signal_handler(signal.SIGUSR1, worker.access_log.reopen)
    stop.wait()
    log.info("stopping: finishing in-flight requests (graceful %.0fs)",
             worker.settings.timeouts.graceful)
    time.sleep(0)
