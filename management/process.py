"""The management process: the management API over every worker of one arbiter.

The arbiter forks it like a worker (`balancer.workers.child_main`) and runs
`CHILD.run` on the inherited management socket; `balancer.serve` finds `CHILD`
through the ``balancer.management`` entry point (pyproject.toml), so the data
plane never imports this package.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import sys
import time
from typing import Any

from balancer.descriptors import RESERVED, soft_limit
from balancer.preload import freeze
from balancer.restarts import Restarts
from balancer.workers import (
    ChildEnv,
    ManagementChild,
    open_child_store,
    report_ready,
    wait_for_stop,
)

log = logging.getLogger("balancer")

MANAGEMENT_DRAIN = 5.0  # seconds an old management process finishes API requests


def parts_only(*packages: str) -> None:
    """Let each package's modules be imported without its `__init__`, unless
    it is imported already (the arbiter preloads them whole when it drops
    privileges). Each module the API imports (`werkzeug.wrappers`,
    `prometheus_client.metrics_core`, ...) is found through the package's path
    as before; what the `__init__`s import for shortcuts the API never uses is
    not (docs/performance.md):

    * werkzeug's imports `werkzeug.serving` (its development server, with
      `http.server`, `socketserver`, `html`) and `werkzeug.test`: 1.0 MiB of
      the management process's memory from its start;
    * prometheus-client's imports `prometheus_client.exposition` (its HTTP
      server and push gateway client: `http.server`, `wsgiref`,
      `urllib.request`, `gzip`) and its metric classes: 1.3 MiB from the
      first scrape (`management.metrics_text.families_text` writes what
      its `generate_latest` wrote)."""
    for name in packages:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is not None:
            sys.modules[name] = importlib.util.module_from_spec(spec)


def run_management(env: ChildEnv, sock: Any) -> int:
    """Serve the management API on `sock` until told to stop."""
    gc.disable()  # during the imports and set-up: `freeze` collects once, then enables it
    import gevent

    parts_only("werkzeug", "prometheus_client")  # before the first of the API's modules
    from balancer.stores.snapshot import Snapshot
    from balancer.turns import turn
    from management.acme_issuer import Issuer
    from management.app import create_app
    from management.certs_watch import CertsWatch
    from management.cluster import ClusterRuntime
    from management.collector import COLLECTOR
    from management.guard import Guard, HostPolicy
    from management.history import FILE_NAME as HISTORY_FILE
    from management.history import History
    from management.mirror import Mirror
    from management.server import ManagementServer, api_connection_cap

    settings = env.settings
    store = open_child_store(settings, strict=False)
    mirror = Mirror(store, Snapshot.of(settings.store.snapshot, store, env.run_dir))
    mirror.start()
    certs_watch = CertsWatch(store, env.run_dir)
    certs_watch.start()
    runtime = ClusterRuntime(env.run_dir, store, settings.effective_workers(),
                             settings.management.apply_timeout, lambda: mirror.problem,
                             lambda: None if mirror.problem else mirror.table,
                             reload_own=mirror.reload)
    history = History(os.path.join(env.run_dir, HISTORY_FILE), turn)
    history.load()
    issuer = Issuer(settings, store, lambda: mirror.table, runtime)
    app = create_app(store=store, runtime=runtime, token=settings.management.token or None,
                     settings=settings, mirror=mirror, history=history, issuer=issuer,
                     certs_watch=certs_watch)
    guard = Guard(app, HostPolicy(sock.getsockname()[0], settings.management.allowed_hosts))
    api = ManagementServer(sock, guard, settings.timeouts, settings.limits.max_header_bytes,
                           api_connection_cap(soft_limit(), RESERVED),
                           lambda env: guard.refusal(env) or app.unauthorized(env))
    api.start()
    app.deployer.start_watching()  # resumes deploys a stopped process handed over
    sampler = gevent.spawn(history_loop, history, runtime)
    issuer.start()
    freeze()  # once set up: start-up objects out of every later collection
    COLLECTOR.install()  # full collections when no big snapshot is alive
    collector = gevent.spawn(COLLECTOR.collect_loop)
    runtime.take_over()  # every worker's counters held before a predecessor stops
    report_ready(env)
    draining = False

    def rebind() -> None:
        # not once draining: a successor (a reload's) keeps the run directory now,
        # and its retired total is the newer (this one's, written first, would
        # have counted the workers retired by the reload as never retired); only
        # when the directory was made again since the handover socket was bound
        # (also called once at start: a SIGHUP before that was ignored)
        if not draining and certs_watch.unbound():
            remade(runtime, certs_watch, history, mirror)

    def stopping() -> None:
        nonlocal draining
        api.drain()  # no accept from now on: every new connection goes to the successor
        draining = True
        runtime.hand_over()  # no retired total written from here; the workers gone retired

    # (the arbiter told it drains once it handed over: the run directory's lock released)
    wait_for_stop(env, rebind=rebind, stopping=stopping)
    sampler.kill()
    collector.kill()
    save_history(history)  # before the drain: the next management process reads it
    app.deployer.stop()
    issuer.stop()  # hands the issuer lock over
    api.stop(timeout=min(MANAGEMENT_DRAIN, settings.timeouts.graceful))
    mirror.stop()
    certs_watch.stop()
    store.close()
    return 0


def history_loop(history: Any, runtime: Any) -> None:
    """Sample the merged stats into the history every `history.INTERVAL` seconds."""
    import gevent

    from management.collector import COLLECTOR
    from management.history import INTERVAL
    from management.http import ApiError

    said = None  # the problem last logged: once an episode (a run directory gone)
    restarts = Restarts("history", log, quiet=False, loop="sampling the stats",
                        then="trying again at the next sample")  # (bug: a traceback a sample)
    while True:
        gevent.sleep(INTERVAL - time.time() % INTERVAL)  # on the interval's boundary
        try:
            with COLLECTOR.held():
                history.sample(runtime.stats({"active": True}), time.time())
            said = None
        except ApiError as exc:
            if exc.message != said:
                log.error("history: no sample: %s", exc.message)
            said = exc.message
        except Exception as exc:  # the next sample tries again; the API keeps answering
            restarts.failed(exc)


def remade(runtime: Any, certs_watch: Any, history: Any, mirror: Any) -> None:
    """The arbiter made the run directory again (it was deleted): write what this
    process keeps there from memory (the retired counters' total first: a reload
    may come next, `ClusterRuntime.restore_kept`; the history, the snapshot's
    copy) and bind the handover socket there again."""
    runtime.restore_kept()
    certs_watch.rebind()
    history.save_in_passing()
    mirror.save_again()


def save_history(history: Any) -> None:
    try:
        history.save()
    except OSError as exc:
        log.error("history: cannot save to %s: %s", history.path, exc)


# what the management process imports after fork: the arbiter imports them before when
# privileges drop (see `balancer.preload`)
CHILD = ManagementChild(run_management, modules=(
    "management.acme_answers", "management.acme_api", "management.acme_ca",
    "management.acme_issuer",
    "management.acme_spread", "management.app", "management.certs_watch", "management.cluster",
    "management.collector",
    "management.deploys",
    "management.guard", "management.history", "management.hosts_api", "management.metrics",
    "management.status_api",
    "management.mirror", "management.process", "management.server",
    # imported lazily by the ACME client: josepy's `default_backend()` and requests'
    # .netrc lookup (found with an "import" audit hook during issuances)
    "cryptography.hazmat.backends.openssl", "netrc", "shlex"))
