"""Importing this module makes the `werkzeug` package importable without its
``__init__``: the management process imports it before its other modules.

werkzeug's ``__init__`` imports its development server and its test client
(`werkzeug.serving`, `werkzeug.test`, and through them `http.server`,
`socketserver`, `html`...), which the management process never uses: it
serves the API with gevent's WSGI server and routes with `werkzeug.routing`
and `werkzeug.wrappers`. Each module imported after fork costs the process
new pages and copies of the arbiter's (the names it interns): these cost it
about 1 MiB until the first `/metrics` scrape, whose prometheus-client
imports `http.server` itself (docs/performance.md, 2026-12-06). werkzeug's submodules import
each other by module, never from the package's namespace, so the package
needs only its path (checked for 3.0.0 and 3.1.8, pyproject's ``werkzeug>=3.0``
has no upper bound: only 3.0's `werkzeug.testapp`, never imported here, reads
``__version__`` from it). A release that breaks this fails
tests/test_memory.py, which imports the app and starts a management process so.

Invariants:
* Only in the management process (and in the arbiter before it forks it, when
  privileges drop): in-process users of `management.app` (tests, another WSGI
  server) import werkzeug whole. A later ``import werkzeug.serving`` or
  ``werkzeug.test`` still works; only ``werkzeug.Request``-style names of the
  package itself are missing.
* When `werkzeug` is already imported, nothing changes; when it cannot be
  found, importing this module raises `ImportError` as ``import werkzeug``
  would.
"""

from __future__ import annotations

import importlib.util
import sys


def register_package() -> None:
    """Put the `werkzeug` package, unexecuted, in `sys.modules` (see above)."""
    if "werkzeug" in sys.modules:
        return
    spec = importlib.util.find_spec("werkzeug")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("No module named 'werkzeug'", name="werkzeug")
    sys.modules["werkzeug"] = importlib.util.module_from_spec(spec)


register_package()
