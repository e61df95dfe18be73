"""What runs in the arbiter's forked children: proxy workers and the start-up
check, and the frame (`child_main`, `ChildEnv`, `ManagementChild`) that the
management process (`management.process`, handed over by the composition root
`balancer.serve`) runs in too.

Each child starts unpatched (the arbiter imported the data plane, and the
management process's modules too when privileges drop, but never
monkey-patched, see `balancer.preload`), forgets the arbiter's signal
handlers, monkey-patches, then builds its own objects (store connection,
`Worker`, WSGI server) from the settings.

Invariants:
* A child leaves only through `os._exit`: it never returns into the
  arbiter's stack, and never runs the arbiter's `finally`/`atexit` code.
* A child reports `READY` (a line on its report pipe, open for its life) only
  once it accepts on the inherited sockets with its routing table loaded; then
  `DRAINING` when it stops accepting, whoever sent the signal.
* A failure while starting exits with `BOOT_ERROR` after printing one
  ``balancer: ...`` line; the arbiter treats it as bad input, not a crash.
* Signals: SIGTERM/SIGINT stop: drain gracefully and answer held requests
  503 at once (also when the arbiter is gone); SIGUSR2 retires a child that
  a reload replaced: it drains the same way but keeps its held requests
  until their rule changes (a SIGTERM during that drain still answers them);
  SIGQUIT exits at once (even mid-drain; a worker tells the arbiter how many
  connections it cut), SIGUSR1 reopens the access log,
  SIGHUP (`startup.REBIND`, from the arbiter only: one sent to the arbiter is a
  reload) binds the child's sockets in the run directory again, which the
  arbiter made again after it was deleted.
* The arbiter's signals are blocked in a child from before its fork until it
  has reset them (`fork_child`, `enter_child`): one sent to it meanwhile is
  never taken by the arbiter's handlers it inherited.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import resource
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from balancer import processlog
from balancer.privileges import Identity, PrivilegeError, assert_dropped, drop_privileges
from balancer.settings import Settings
from balancer.signal_queue import forget, held

log = logging.getLogger("balancer")

BOOT_ERROR = 3
PARENT_CHECK = 1.0  # seconds between checks that the arbiter is still there
STOP_MARGIN = 0.5  # a worker stops this much before the arbiter's `graceful` deadline
GC_THRESHOLDS = (20000, 20, 100)  # gc.set_threshold in a proxy worker (see `tune_gc`)
# what the arbiter handles (`balancer.signal_queue`); a child stops (default action)
# or ignores them until it installs its own (`enter_child`). SIGUSR2 retires a child
# (`wait_for_stop`); the arbiter ignores it, saying so (its default action killed
# the arbiter: an operator used to HAProxy's reload or nginx's upgrade sends it)


class BootError(Exception):
    """A child could not start; the message is one line naming the problem.

    `code` is the exit status `balancer serve` reports when the start-up check
    finds it: 2 for a bad setting, 1 for a resource that cannot be used."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ManagementChild:
    """How the arbiter runs the management process.

    The data plane never imports `management`: the composition root
    (`balancer.serve`) finds this through the ``balancer.management`` entry
    point and hands it to the arbiter."""

    run: Callable[[ChildEnv, Any], int]  # the child's body, on the inherited management socket
    modules: tuple[str, ...] = ()        # imported by the arbiter when privileges drop
    #                                      (`balancer.preload`)


@dataclass(frozen=True)
class ChildEnv:
    """What every child gets from the arbiter."""

    settings: Settings
    run_dir: str
    ready_fd: int
    identity: Identity | None   # set when the arbiter dropped privileges: verified again
    arbiter_pid: int
    inherited_fds: tuple[int, ...]  # arbiter-only descriptors the child closes
    patch: bool = True  # monkey-patch (the start-up check does no socket I/O: it need not)


def child_main(body: Callable[[ChildEnv], int], env: ChildEnv) -> NoReturn:
    """Run `body` in a fresh child and leave the process with its exit code."""
    code = 1
    try:
        enter_child(env)
        code = body(env)
    except BootError as exc:
        print(f"balancer: {exc}", file=sys.stderr)
        code = BOOT_ERROR
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - the last word of a child process
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            processlog.drain()  # a boot error's reason too, within EXIT_WAIT
        os._exit(code)


def fork_child(body: Callable[[ChildEnv], int], env: ChildEnv) -> int:
    """Fork a child that runs `body` (`child_main`); its pid, in the parent.

    The arbiter's signals stay blocked in the child until it has reset them
    (`enter_child`). Bug: one that came before ran the arbiter's handler in the
    child, which writes the signal number to the arbiter's wake-up pipe (the
    same pipe, inherited): the SIGHUP that `startup.RunDirKeeper` sends every
    child reached a worker forked in the same turn of the loop (one restarted),
    and the arbiter took it as its own and reloaded, replacing every child."""
    with held():
        pid = os.fork()
        if pid == 0:
            child_main(body, env)
    return pid


def enter_child(env: ChildEnv) -> None:
    """Forget the arbiter's signal handling and descriptors, then monkey-patch."""
    forget()  # (a SIGTERM that came since the fork stops the child, a SIGHUP is dropped)
    for fd in env.inherited_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    if env.patch:
        from balancer.preload import patch

        patch()
    try:
        assert_dropped(env.identity)
    except PrivilegeError as exc:
        raise BootError(str(exc)) from None


# what a child tells the arbiter, one line each, on its report pipe (`ChildEnv.ready_fd`,
# open for the child's life: its end of file is the child's exit)
READY = b"ready"        # it serves
DRAINING = b"draining"  # it stops accepting: told to, or signalled directly
CUT = b"cut"            # ``cut N``: a worker stopping now (SIGQUIT) cuts N connections
DRAINED = b"drained"    # a worker's drain ended (nothing left to cut): it exits


def tell_arbiter(env: ChildEnv, *words: object) -> None:
    """One line to the arbiter. Never blocks for long: a few bytes per child's life in a
    pipe the arbiter reads at every turn; with the arbiter gone the write fails."""
    line = b" ".join(w if isinstance(w, bytes) else str(w).encode() for w in words)
    with contextlib.suppress(OSError):
        os.write(env.ready_fd, line + b"\n")


def report_ready(env: ChildEnv) -> None:
    tell_arbiter(env, READY)


def wait_for_stop(env: ChildEnv, reopen: Callable[[], None] | None = None,
                  release: Callable[[], None] | None = None,
                  rebind: Callable[[], None] | None = None,
                  connections: Callable[[], int] | None = None,
                  stopping: Callable[[], None] | None = None) -> None:
    """Block until the child must drain: SIGTERM/SIGINT, SIGUSR2 (retired by a
    reload), or the arbiter is gone; then tell the arbiter (`DRAINING`: one
    signalled directly is replaced at once). `release` (answer held requests) runs on
    every stop but a retirement, also one that comes during the drain; `rebind`
    on SIGHUP (the run directory made again), also during the drain, and once
    as its handler is in place. SIGQUIT exits at once, telling the arbiter how
    many `connections` it cuts (a worker's). `stopping` runs before the arbiter is
    told (the management process stops accepting and hands over: `run_management`)."""
    import gevent
    from gevent.event import Event

    stop = Event()

    def stop_for_good() -> None:
        if release is not None:
            release()
        stop.set()

    gevent.signal_handler(signal.SIGTERM, stop_for_good)
    gevent.signal_handler(signal.SIGINT, stop_for_good)
    gevent.signal_handler(signal.SIGUSR2, stop.set)
    def quit_now() -> None:
        if connections is not None:
            tell_arbiter(env, CUT, connections())
        os._exit(0)

    gevent.signal_handler(signal.SIGQUIT, quit_now)
    if reopen is not None:
        gevent.signal_handler(signal.SIGUSR1, reopen)
    if rebind is not None:
        gevent.signal_handler(signal.SIGHUP, rebind)
        # a SIGHUP before now was ignored (`enter_child`), its sockets already bound:
        # the run directory deleted and made again meanwhile is caught here. Bug: a
        # management process starting then left its handover socket missing until
        # a reload
        rebind()

    def parent_loop() -> None:
        while os.getppid() == env.arbiter_pid:
            gevent.sleep(PARENT_CHECK)
        log.error("the arbiter (pid %d) is gone; stopping", env.arbiter_pid)
        stop_for_good()

    watcher = gevent.spawn(parent_loop)
    stop.wait()
    watcher.kill(block=False)
    if stopping is not None:
        stopping()
    tell_arbiter(env, DRAINING)


def open_child_store(settings: Settings, strict: bool = True) -> Any:
    """The store, `BootError` when it cannot be opened; not `strict` in a child that
    serves (a file store whose directory went away opens, and its reads report it)."""
    from balancer.stores import StoreError, open_store

    try:
        return open_store(settings.store.url, settings.store.namespace,
                          settings.store.resync_interval, strict)
    except ValueError as exc:
        raise BootError(f"store.url: {exc}", 2) from None
    except StoreError as exc:
        raise BootError(f"store.url: {exc}") from None


# proxy worker -------------------------------------------------------------------
def run_worker(env: ChildEnv, listeners: list[tuple[Any, str]]) -> int:
    """A proxy worker: serve the inherited listeners until told to stop."""
    from balancer.accesslog import AccessLogError
    from balancer.control import ControlServer, retire
    from balancer.server import Worker

    settings = env.settings
    store = open_child_store(settings, strict=False)
    store.quiet = True  # the management process reports store problems once
    worker = Worker(settings, store, run_dir=env.run_dir)
    initial_load(worker)
    try:
        worker.start()
    except AccessLogError as exc:
        raise BootError(f"log.access_log: {exc}") from None
    control = ControlServer(env.run_dir, worker)
    control.start()
    caught_up(worker)
    worker.listen(listeners)
    tune_gc()
    report_ready(env)
    log.info("worker %d serving routing version %d", os.getpid(), worker.holder.table.version)
    wait_for_stop(env, worker.access_log.reopen, worker.release_held, control.rebind,
                  lambda: worker.stats.open_connections)
    graceful = settings.timeouts.graceful
    worker.stop(max(graceful - STOP_MARGIN, graceful / 2))
    retire(env.run_dir, worker, control)
    tell_arbiter(env, DRAINED)
    return 0


def tune_gc() -> None:
    """Collect cycles less often in a serving worker.

    Every in-flight request keeps a few container objects alive for a loop
    iteration or more (1.5 s at 5,000 busy connections), so with Python's
    default thresholds they survive young collections and trigger full ones
    over every connection's objects again and again. So start-up objects are
    frozen and the young generation is collected every GC_THRESHOLDS[0]
    allocations instead of 700 (measured in docs/ARCHITECTURE.md); requests
    make no reference cycles, so garbage still goes at once by reference
    counting. A big table loaded later pauses the collector and is frozen too
    (`balancer.big_loads`).
    """
    from balancer import big_loads

    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    big_loads.enable()


def initial_load(worker: Any) -> None:
    """Load the table once (the store's, or the last good one when the store is
    unreachable or lost it); with neither, serving starts anyway."""
    from balancer.stores.base import StoreError

    try:
        worker.tables.start_table()
    except StoreError as exc:
        worker.tables.store_problem = worker.store.told(exc)
        log.error("%s; serving the no-hosts page until it recovers",
                  worker.tables.store_problem)


def caught_up(worker: Any) -> None:
    """Serve the store's version of now, read after the control socket exists and
    before the first connection is accepted: a write stored before the management
    process could see this worker was not waited for (its answer did not name it),
    so it must be served at once. Bug: a write made between the worker's first read
    and its control socket was answered 200 while the new worker served the older
    table until its store's watcher caught up. Costs one cheap read (Redis: ``GET``
    and ``HLEN``; the file store: an ``fstat``), a whole read only when such a write
    came; none when the first read failed (the store unreachable: its watcher
    follows it once it is back, and the start waits for no timeout again)."""
    from balancer.stores.base import StoreError

    if worker.tables.store_problem is not None:
        return
    try:
        if worker.store.current_shape()[0] > worker.holder.table.version:
            worker.tables.reload()
    except StoreError:
        pass  # unreachable since the first read: the watcher tells and follows it


# start-up check -------------------------------------------------------------------
def run_check(env: ChildEnv, identity: Identity | None) -> int:
    """As the run user (`identity`): the store opens, the pages load, the access
    log opens. A problem is written as one line to the child's ready pipe;
    the exit code is its `code`."""
    try:
        drop_for_check(identity)
        check_startup(env.settings)
    except BootError as exc:
        os.write(env.ready_fd, str(exc).encode())
        return exc.code
    return 0


def check_startup(settings: Settings) -> None:
    """Open (and close) what a worker opens, raising `BootError` naming the setting."""
    from balancer.accesslog import AccessLog, AccessLogError
    from balancer.pages import PageError, Pages

    open_child_store(settings).close()
    try:
        Pages.load(settings.server.pages_dir)
    except PageError as exc:
        raise BootError(f"server.pages_dir: {exc}") from None
    try:
        AccessLog(settings.log.access_log, settings.log.access_format).check()
    except AccessLogError as exc:
        raise BootError(f"log.access_log: {exc}") from None
    check_readable("acme.ca_bundle", settings.acme.ca_bundle)
    check_file_size_limit()


def check_file_size_limit() -> None:
    """The file size limit (RLIMIT_FSIZE) leaves room for the workers' shared table
    of `limits` in the run directory. Bug: under a lower one (``ulimit -f``,
    systemd ``LimitFSIZE=``) every worker died at its start, again and again,
    while the balancer announced it was listening: no request was answered."""
    from balancer.limits import FILE_NAME, TABLE_BYTES

    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY and soft < TABLE_BYTES:
        raise BootError(f"the file size limit is {soft} bytes (ulimit -f, systemd "
                        f"LimitFSIZE=): the workers share a {TABLE_BYTES >> 20} MiB file "
                        f"({FILE_NAME}, in the run directory); raise the limit to at least "
                        f"{TABLE_BYTES >> 20} MiB, or remove it")


def check_readable(name: str, path: str) -> None:
    """A file the management process reads after privileges drop (the ACME
    issuer's CA bundle, at each issuance) must be readable by the run user."""
    if not path:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise BootError(f"{name}: {path!r}: cannot read as the run user (uid {os.getuid()}): "
                        f"{exc.strerror or exc}") from None


def drop_for_check(identity: Identity | None) -> None:
    """The start-up check runs as the user the workers will run as."""
    try:
        drop_privileges(identity)
    except PrivilegeError as exc:
        raise BootError(str(exc)) from None
