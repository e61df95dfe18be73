"""Import, before the first fork, the modules the arbiter's children share.

What the arbiter imports is shared by every child it forks (copy-on-write),
and ready at once in a replacement worker; what it imports but a child never
uses still counts in that child's resident set (its pages are mapped). So
the arbiter imports the data plane every child runs (gevent, the worker's
code, and only the store the settings name: no `redis` on a file store),
and the management process imports its own modules (werkzeug, gevent's
WSGI server with `http.client` and `email`, prometheus-client, the ACME
client and cryptography when it first needs them) after fork, where only it
pays for them.

A process that dropped root may be unable to read the Python installation
(a Python under /root, mode 0700, is common): when the arbiter drops
privileges (`server.user` as root), nothing can be imported after the drop,
so it also imports every module the management process may need later
(`ManagementChild.modules`: the ACME client is needed whenever a rule asks
for a certificate). A reload whose settings need a module the arbiter
cannot import then is refused (`preload` raises `PreloadError`).

Before each fork the arbiter freezes its objects (`freeze`): the garbage
collector of a child then never visits them, and the pages they live on
stay shared with the arbiter instead of being copied into every child by
its first full collection (docs/performance.md: 105 → 71 MiB for an idle
tree with one worker); and it gives its heap's free pages back. A child
still copies every shared page whose objects it runs or reads (reference
counts), so what children run at start matters too: the arbiter looks
gevent's plugins up once, at start (`resolve_gevent_plugins`, through
`balancer.entry_points`: `importlib.metadata` is never imported here)
instead of every child's `monkey.patch_all` scanning the installed packages
for them.

Invariants:
* Importing is not patching: the arbiter still never monkey-patches, and
  nothing imported here creates a socket, thread, lock or gevent hub at
  import time that a child would use after patching (checked for these
  modules: werkzeug's and prometheus-client's module-level locks are only held
  without a greenlet switch).
* The lists are what a worker and the management process import after fork
  (measured by diffing `sys.modules`); `tests/test_process.py` runs a whole
  cluster as `nobody` to keep them honest, and `tests/test_memory.py` checks
  that the arbiter and a worker hold none of the management process's
  modules when privileges are not dropped.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import warnings
from collections.abc import Mapping
from typing import Any

from balancer.entry_points import Target, load
from balancer.heap import release
from balancer.settings import Settings
from balancer.stores.urls import store_kind

DATA_PLANE = (
    # gevent.monkey.patch_all and a running hub (its plugin scan, thread pool, resolver)
    "gevent.monkey", "gevent.events", "gevent.socket", "gevent.ssl", "gevent.select",
    "gevent.selectors", "gevent.signal", "gevent.thread",
    "gevent.threading", "gevent.time", "gevent.os", "gevent.local", "gevent.threadpool",
    "gevent.resolver.thread", "gevent.util",
    "zope.event", "encodings.idna", "_threading_local",
    # the children's own code; `balancer.resting`: the control sockets' and the
    # management API's server, which every child imports (a copy in each otherwise)
    "balancer.accesslog", "balancer.control", "balancer.diagnosis", "balancer.server",
    "balancer.resting",
)
STORES = {"file": ("balancer.stores.file",), "redis": ("balancer.stores.redis",)}
# what the arbiter itself may import only on a reload (`balancer.settings`: a config
# file read, a mistake's closest setting named): before the drop, else never
SETTINGS_LATER = ("tomllib", "difflib")
# imported by gevent.monkey depending on the Python version
OPTIONAL = ("gevent.monkey._patch_thread_common", "gevent.monkey._patch_thread_lt313",
            "gevent.monkey._patch_thread_gte313")


class PreloadError(Exception):
    """A module the settings need cannot be imported (after the drop: unreadable)."""


def needed(settings: Settings, management: tuple[str, ...], dropping: bool) -> tuple[str, ...]:
    """The modules the arbiter imports for `settings`: the data plane with its
    store, plus the management process's (`management`) and its own later ones
    (`SETTINGS_LATER`) when `dropping`."""
    return (*DATA_PLANE, *STORES[store_kind(settings.store.url)],
            *((*management, *SETTINGS_LATER) if dropping else ()))


def preload(names: tuple[str, ...]) -> None:
    """Import `names` and whichever `OPTIONAL` exist; `PreloadError` names the
    first module that cannot be imported."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise PreloadError(f"cannot import {name}: {exc}") from None
    for name in OPTIONAL:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def freeze() -> None:
    """Before a fork: move every object the arbiter holds out of the collector's
    reach, so that no child's collection writes to (and copies) their pages.

    Garbage is collected first, so that none is kept frozen for good (7 ms
    before the first fork, nothing measurable after: the rest is frozen; the
    children's memory was the same either way). The collector is on from
    here: paused during the start-up's imports (`balancer.cli.main`, the
    management process's `run_management`), this is its one collection of them."""
    gc.collect()
    gc.freeze()
    gc.enable()
    release()


def gevent_plugin_groups() -> tuple[str, ...]:
    """The entry point groups gevent calls plugins of (one per kind of event)."""
    import gevent.events

    names = (getattr(cls, "ENTRY_POINT_NAME", None) for cls in vars(gevent.events).values()
             if isinstance(cls, type))
    return tuple(sorted({name for name in names if isinstance(name, str)}))


def resolve_gevent_plugins(found: Mapping[str, tuple[Target, ...]]) -> None:
    """In the arbiter, at start: make a child's `monkey.patch_all` call the
    plugins `found` (`balancer.entry_points.look_up` of `gevent_plugin_groups`)
    without scanning every installed distribution's metadata for each of its
    events.

    gevent looks its plugins up again for every event patching emits (one
    per patched module: 3,151 ``entry_points.txt`` files read per
    `patch_all` on the test machine), running code and allocating over pages
    the child shares with the arbiter: 0.6 MiB of them copied into each
    child, and a slower start (docs/performance.md). The plugins are loaded
    and called in the child as gevent does; a group not in `found` is
    looked up as gevent does when its event comes, and a gevent without
    `notify_and_call_entry_points` just scans as before."""
    import gevent.events

    notify = gevent.events.notify
    scan = gevent.events.notify_and_call_entry_points

    def notify_and_call_entry_points(event: Any) -> None:
        group = event.ENTRY_POINT_NAME
        if group not in found:
            scan(event)
            return
        notify(event)
        for plugin in found[group]:
            load(plugin)(event)

    gevent.events.notify_and_call_entry_points = notify_and_call_entry_points


def patch() -> None:
    """In a child, right after fork: gevent's `monkey.patch_all`, all but
    `subprocess`.

    No child starts a process (the arbiter forks them all), and patching
    `subprocess` imports `gevent.subprocess` with `subprocess` and `pickle`,
    which the arbiter would then preload for every child: about 0.45 MiB of the
    arbiter's objects, and 0.13 MiB more pages each child copies while it
    patches (docs/performance.md, 2026-12-06, night, "`subprocess` left
    unpatched").
    A library that started a process in a child would block its worker while
    it waits; none the children import does (tests/test_memory.py checks that
    no process imports `subprocess` on a file store)."""
    from gevent import monkey

    # gevent warns when it patches `ssl` after an import; no SSL object exists yet
    warnings.simplefilter("ignore", monkey.MonkeyPatchWarning)
    monkey.patch_all(subprocess=False)
