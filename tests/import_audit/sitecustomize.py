"""Test aid (tests/test_acme.py, tests/test_memory.py): with this directory on
PYTHONPATH and IMPORT_AUDIT_DIR set, every module a process imports is
appended to IMPORT_AUDIT_DIR/imports-PID.txt, and every distribution's
entry_points.txt it reads (a scan of the installed packages' metadata) to
IMPORT_AUDIT_DIR/metadata-PID.txt. An import made by a process that started as
root and no longer runs as root also goes to IMPORT_AUDIT_DIR/dropped-PID.txt:
a child that dropped privileges may not be able to read the Python
installation, so whatever it imports must have been preloaded
(`balancer.preload`); without a drop, each process must import only what it
uses (its memory). At each fork, connect and first import, whether the
garbage collector is on goes to IMPORT_AUDIT_DIR/gc-PID.txt (``TIME EVENT 0|1``,
TIME `time.monotonic`, the same clock in every process): start-up pauses it
(`balancer.cli.main`), and a process running long with it off keeps its
cyclic garbage."""

import gc
import os
import sys
import time

_DIRECTORY = os.environ.get("IMPORT_AUDIT_DIR")
_ROOT_AT_START = os.geteuid() == 0


def _note(kind: str, line: str) -> None:
    try:
        with open(os.path.join(_DIRECTORY, f"{kind}-{os.getpid()}.txt"), "a") as f:
            f.write(f"{line}\n")
    except OSError:  # (a file made before the drop): the import itself goes on
        pass


def _audit(event: str, args: tuple) -> None:
    if event in ("os.fork", "socket.connect") or \
            (event == "import" and args[0] not in sys.modules):
        _note("gc", f"{time.monotonic()} {event} {int(gc.isenabled())}")
    if event == "import" and args[0] not in sys.modules:
        _note("imports", args[0])
        if _ROOT_AT_START and os.geteuid() != 0:
            _note("dropped", args[0])
    elif event == "open" and str(args[0]).endswith("entry_points.txt"):
        _note("metadata", str(args[0]))


if _DIRECTORY:
    sys.addaudithook(_audit)
