"""Import, before privileges drop, every module the arbiter's children use.

A process that dropped root may be unable to read the Python installation
(a Python under /root, mode 0700, is common), so the arbiter imports its
children's modules while it still can; children inherit them through fork.
This also makes a replacement worker ready sooner and shares the modules'
memory between workers (copy-on-write).

Invariants:
* Importing is not patching: the arbiter still never monkey-patches, and
  nothing imported here creates a socket, thread, lock or gevent hub at
  import time that a child would use after patching (checked for these
  modules: werkzeug's and prometheus-client's module-level locks are only held
  without a greenlet switch).
* The list is what a worker and the management process import after fork
  (measured by diffing `sys.modules`); `tests/test_process.py` runs a whole
  cluster as `nobody` to keep it honest.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings

MODULES = (
    # gevent.monkey.patch_all and a running hub (its plugin scan, thread pool, resolver)
    "gevent.monkey", "gevent.events", "gevent.socket", "gevent.ssl", "gevent.select",
    "gevent.selectors", "gevent.signal", "gevent.subprocess", "gevent.thread",
    "gevent.threading", "gevent.time", "gevent.os", "gevent.local", "gevent.threadpool",
    "gevent.resolver.thread", "gevent.pywsgi", "gevent.util", "importlib.metadata",
    "zope.event", "encodings.idna", "_threading_local",
    # the children's own code
    "balancer.accesslog", "balancer.control", "balancer.diagnosis", "balancer.server",
    "balancer.stores.file", "balancer.stores.redis",
)
# imported by gevent.monkey depending on the Python version
OPTIONAL = ("gevent.monkey._patch_thread_common", "gevent.monkey._patch_thread_lt313",
            "gevent.monkey._patch_thread_gte313")


def preload(extra: tuple[str, ...] = ()) -> None:
    """Import `MODULES`, `extra` (the management process's) and whichever `OPTIONAL` exist."""
    for name in (*MODULES, *extra):
        importlib.import_module(name)
    for name in OPTIONAL:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def quiet_patch_warnings() -> None:
    """gevent warns when it patches `ssl` after an import; no SSL object exists yet."""
    from gevent.monkey import MonkeyPatchWarning

    warnings.simplefilter("ignore", MonkeyPatchWarning)
