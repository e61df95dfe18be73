"""`balancer serve`: check, bind, drop privileges, then hand over to the arbiter.

Steps: raise the descriptor limit (`balancer.descriptors`) → import what the
children share (`balancer.preload`: the data plane and its store; the
management process's modules too when privileges will drop) → check in a
throwaway child that the store, pages and access log open (as the run user)
→ bind every listener (one socket per worker with SO_REUSEPORT, or one
shared: `balancer.listening`; a bind failure exits non-zero naming the
address) → create the private run
directory → drop privileges → lock it and remove those left by killed
balancers (`balancer.leftovers`) → `Arbiter.run` forks the management process and
the workers and keeps them alive until a stop signal. The ``listening on ADDR
for proxy|internal|management`` lines are logged once every child first is
ready: from then on requests are served with the routing table loaded.

Nothing here monkey-patches: every child does after fork (`balancer.workers`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from balancer import leftovers, native
from balancer.addr import Address
from balancer.arbiter import Arbiter, Bound
from balancer.descriptors import log_limits, raise_limit
from balancer.entry_points import Target, load, look_up
from balancer.listening import Listeners, bind_group, slot_count
from balancer.preload import (
    PreloadError,
    gevent_plugin_groups,
    needed,
    preload,
    resolve_gevent_plugins,
)
from balancer.privileges import Identity, PrivilegeError, drop_privileges, resolve
from balancer.settings import BY_NAME, Settings
from balancer.signal_queue import SignalQueue, stop_asked
from balancer.startup import check_in_child
from balancer.stores.urls import redact_url
from balancer.workers import ManagementChild

log = logging.getLogger("balancer")
MANAGEMENT_GROUP = "balancer.management"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


ROLE_SETTINGS = {"proxy": "server.listen", "internal": "server.internal_listen",
                 "tls": "tls.listen", "management": "management.listen"}
BIND_HINTS = {
    errno.EADDRINUSE: "another process listens there: stop it, or give another address",
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE; or give another address",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address; give another one",
}


def bind_all(addresses: list[tuple[Address, str]], slots: int = 1) -> Listeners:
    """Bind every listener (`slots` sockets each, `balancer.listening`) or exit
    naming the one that failed and its setting."""
    groups = []
    for address, role in addresses:
        try:
            groups.append(bind_group(address, role, slots))
        except OSError as exc:
            print(f"balancer: {bind_problem(address, role, exc)}", file=sys.stderr)
            raise SystemExit(1) from None
    return Listeners(groups)


def bind_problem(address: Address, role: str, exc: OSError) -> str:
    """``SETTING: cannot listen on ADDR: REASON (what to do: flag, env, file key)``."""
    setting = BY_NAME[ROLE_SETTINGS[role]]
    where = ", ".join(filter(None, (setting.flag, setting.env,
                                    f"[{setting.section}] {setting.key}")))
    hint = BIND_HINTS.get(exc.errno or 0, "give another address")
    return (f"{setting.name}: cannot listen on {address}: {exc.strerror or exc} "
            f"({hint}: {where})")


def bound_name(sock: Any) -> str:
    """The address a listening socket is bound to, as `host:port` / `[v6]:port`."""
    host, port = sock.getsockname()[:2]
    return str(Address(host, port))


def listener_addresses(settings: Settings) -> list[tuple[Address, str]]:
    """Every proxy listener and its role: "proxy", "internal" (trusted) or "tls"."""
    server = settings.server
    return ([(a, "proxy") for a in server.listen]
            + [(a, "internal") for a in server.internal_listen]
            + [(a, "tls") for a in settings.tls.listen])


def serve(settings: Settings, signals: SignalQueue,
          reload_settings: Callable[[], Settings] | None = None) -> int:
    """Run the arbiter until SIGTERM/SIGINT/SIGQUIT; the process exit code.

    `signals` were queued since the command started (`balancer.signal_queue`);
    `reload_settings` re-reads the same flags, environment and config file
    (SIGHUP)."""
    logging.basicConfig(level=settings.log.level.upper(), format=LOG_FORMAT)
    limits = raise_limit()  # before any child is forked; logged once serving
    warn_open_management(settings)
    try:
        identity = resolve(settings.server.user, settings.server.group)
    except PrivilegeError as exc:
        return fail(str(exc), 2)
    try:
        found = look_up((MANAGEMENT_GROUP, *gevent_plugin_groups()))
        management_child = load_management(found[MANAGEMENT_GROUP])
    except LookupError as exc:
        return fail(str(exc), 1)
    resolve_gevent_plugins(found)
    dropping = identity is not None and os.geteuid() == 0
    try:
        preload(needed(settings, management_child.modules, dropping))
    except PreloadError as exc:
        return fail(str(exc), 1)
    problem = check_in_child(settings, identity, signals.fds)
    if stop_asked():  # (it ended the check's wait: nothing is bound or forked yet)
        return stopped()
    if problem is not None:
        return fail(problem[1], problem[0])
    slots = slot_count(settings.effective_workers(), settings.server.reuseport)
    listeners = bind_all(listener_addresses(settings), slots)
    management = bind_all([(settings.management.listen, "management")]).first()[0][0]
    run_dir = make_run_dir(identity)
    try:
        try:
            dropped = drop_privileges(identity)
        except PrivilegeError as exc:
            return fail(str(exc), 1)
        if dropped:
            log.info("running as %s", identity)
        with contextlib.suppress(OSError):  # (no room for the file: never swept then)
            leftovers.hold(run_dir)  # the descriptor stays open: the children inherit it
        leftovers.sweep(run_dir)
        bound = Bound(listeners, management, run_dir, identity if dropped else None)
        return Arbiter(settings, bound, management_child, signals, reload_settings,
                       lambda: announce(settings, listeners, management, limits)).run()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def warn_open_management(settings: Settings) -> None:
    """A warning when ``BALANCER_TOKEN`` is set and the management API has no token:
    that variable is balancerctl's, so an operator who exported it for both commands
    believes the API protected while it answers anyone who reaches it."""
    if os.environ.get("BALANCER_TOKEN") and not settings.management.token:
        log.warning("BALANCER_TOKEN is set, but it is balancerctl's: the management API has "
                    "no token; set it with BALANCER_MANAGEMENT_TOKEN, --token or "
                    "[management] token")


def load_management(found: tuple[Target, ...]) -> ManagementChild:
    """The management process, from the ``balancer.management`` entry point
    named ``child`` among `found` (that group's, `balancer.entry_points.look_up`).

    This is where the composition root wires the management package in: the
    data plane itself never imports `management`."""
    named = [target for target in found if target.name == "child"]
    if not named:
        raise LookupError(f"no {MANAGEMENT_GROUP!r} entry point: the balancer package is not "
                          f"installed (pip install .)")
    child = load(named[0])
    if not isinstance(child, ManagementChild):
        raise LookupError(f"entry point {MANAGEMENT_GROUP!r} is not a ManagementChild")
    return child


def announce(settings: Settings, listeners: Listeners, management: Any,
             limits: tuple[int, int]) -> None:
    """The lines that say the balancer serves (tests and scripts wait for them),
    and what the descriptor limit allows (`limits`: the soft limit before and
    after `raise_limit`)."""
    for sock, role in listeners.first():
        log.info("listening on %s for %s", bound_name(sock), role)
    log.info("listening on %s for management", bound_name(management))
    log.info("store %s, %d worker(s)%s", redact_url(settings.store.url),
             settings.effective_workers(), sharing(settings, listeners))
    old, line = native.report()
    (log.warning if old else log.info)("%s", line)
    log_limits(settings.server.max_connections, *limits)


def sharing(settings: Settings, listeners: Listeners) -> str:
    """How the workers share the listeners, for the start-up line."""
    if listeners.slots > 1:
        return ", one listening socket per worker (SO_REUSEPORT)"
    if settings.effective_workers() > 1:
        why = "server.reuseport is false" if not settings.server.reuseport else \
            "SO_REUSEPORT spreads connections only on Linux"
        return f", sharing one listening socket ({why})"
    return ""


# The longest name of a socket made in the run directory (management/certs_watch.py's,
# for a pid up to 2**22), and the longest AF_UNIX path Linux takes.
LONGEST_SOCKET = "certs-management-4194304.sock"
MAX_SOCKET_PATH = 107


def make_run_dir(identity: Identity | None) -> str:
    """The private directory of the control sockets (mode 0700, owned by the run user):
    in ``$TMPDIR``, or in /tmp when that leaves no room for a socket's path. Bug: with
    a ``$TMPDIR`` of 70 bytes or more the management process died binding its socket
    ("AF_UNIX path too long") and was restarted in a loop: no management API, ever."""
    path = tempfile.mkdtemp(prefix="balancer-")
    if len(os.path.join(path, LONGEST_SOCKET).encode()) > MAX_SOCKET_PATH:
        os.rmdir(path)
        path = tempfile.mkdtemp(prefix="balancer-", dir="/tmp")
        log.warning("TMPDIR %s is too long a path for the control sockets (at most %d "
                    "bytes with their names): the run directory is %s", tempfile.gettempdir(),
                    MAX_SOCKET_PATH, path)
    if identity is not None and os.geteuid() == 0:
        with contextlib.suppress(OSError):
            os.chown(path, identity.uid, identity.gid)
    return path


def stopped() -> int:
    """A stop signal came while a start-up step waited: nothing to undo yet."""
    print("balancer: stopped by a signal before it started", file=sys.stderr)
    return 0


def fail(message: str, code: int) -> int:
    print(f"balancer: {message}", file=sys.stderr)
    return code
