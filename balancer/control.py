"""Per-worker control sockets: how the management process sees every worker.

Each worker serves a unix socket ``DIR/worker-PID.sock`` (DIR is the
arbiter's private run directory, mode 0700, owned by the run user). A client
sends one command line and reads one JSON reply until EOF:

* ``stats``  → ``{"pid", "loaded", "draining", "version", "started", "stats": SNAPSHOT}``
* ``reload`` → ``{"pid", "version"}`` or ``{"pid", "error": TEXT}``

Invariants:
* Nothing is exchanged per request: a snapshot is built from the worker's
  plain counters only when asked (at scrape time).
* A worker that exits gracefully leaves its final counters in
  ``DIR/retired-PID.json`` (gauges zeroed), so cluster totals never go
  backwards across a reload.
* A missing or dead socket is skipped, never an error: workers come and go.
* A worker's counters are either live (its socket is listed) or retired,
  never both: retiring (write the file, remove the socket) and reading
  (list, ask, fold the retired files) hold the run directory's lock. The
  lock is polled, never blocked on, so a gevent process keeps answering.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

COMMANDS = ("stats", "reload")
CONTROL_TIMEOUT = 2.0
MAX_COMMAND = 64
WORKER_GLOB = "worker-*.sock"
RETIRED_GLOB = "retired-*.json"
LOCK_POLL = 0.005


def control_path(directory: str, pid: int) -> str:
    return os.path.join(directory, f"worker-{pid}.sock")


def retired_path(directory: str, pid: int) -> str:
    return os.path.join(directory, f"retired-{pid}.json")


# worker side --------------------------------------------------------------------
class ControlServer:
    """Answers control commands for one worker (run inside the worker's gevent hub)."""

    def __init__(self, directory: str, worker: Any) -> None:
        from gevent.pool import Pool
        from gevent.server import StreamServer

        self.path = control_path(directory, os.getpid())
        self.worker = worker
        self.started = time.time()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale socket of a recycled pid
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(64)
        self.server = StreamServer(listener, self.handle, spawn=Pool(16))

    def start(self) -> None:
        self.server.start()

    def close(self) -> None:
        """Stop answering and remove the socket file."""
        self.server.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def handle(self, sock: socket.socket, address: Any) -> None:
        try:
            sock.settimeout(CONTROL_TIMEOUT)
            command = _read_command(sock)
            sock.sendall(json.dumps(self.answer(command)).encode())
        except OSError:
            pass
        finally:
            sock.close()

    def answer(self, command: str) -> dict[str, Any]:
        worker = self.worker
        if command == "reload":
            from balancer.stores.base import StoreError

            try:
                return {"pid": os.getpid(), "version": worker.reload()}
            except StoreError as exc:
                return {"pid": os.getpid(), "error": str(exc)}
        if command == "stats":
            return {"pid": os.getpid(), "loaded": worker.loaded, "draining": worker.draining,
                    "version": worker.holder.table.version, "started": self.started,
                    "stats": worker_snapshot(worker)}
        return {"pid": os.getpid(), "error": f"unknown command {command!r}; "
                                             f"commands are {', '.join(COMMANDS)}"}


def worker_snapshot(worker: Any) -> dict[str, Any]:
    """The worker's stats snapshot, with its own view of the store."""
    snapshot = worker.stats.snapshot()
    snapshot["store_up"] = int(worker.store.is_reachable())
    return snapshot


def retire(directory: str, worker: Any, control: ControlServer) -> None:
    """Hand a drained worker's counters over from its socket to a retired file."""
    with run_dir_lock(directory):
        write_retired(directory, worker)
        control.close()


def write_retired(directory: str, worker: Any) -> None:
    """Leave the counters of an exiting worker for the management process to keep."""
    path = retired_path(directory, os.getpid())
    tmp = path + ".tmp"
    with open(tmp, "w") as out:
        json.dump(counters_only(worker_snapshot(worker)), out)
    os.replace(tmp, path)


def counters_only(snapshot: dict[str, Any]) -> dict[str, Any]:
    """`snapshot` with every gauge set to its neutral value for `merge_snapshots`."""
    snapshot.update(open_connections=0, routing_version=0, store_up=1, last_reload=0.0)
    for host in snapshot.get("hosts", {}).values():
        host.update(open_requests=0, spinning=0)
        for backend in host.get("backends", {}).values():
            backend.update(state="up", in_flight=0)
    return snapshot


@contextlib.contextmanager
def run_dir_lock(directory: str) -> Iterator[None]:
    """Hold the run directory's exclusive lock (polled: the gevent hub keeps running)."""
    import gevent

    fd = os.open(os.path.join(directory, "run.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                gevent.sleep(LOCK_POLL)
        yield
    finally:
        os.close(fd)


def _read_command(sock: socket.socket) -> str:
    data = b""
    while b"\n" not in data and len(data) < MAX_COMMAND:
        chunk = sock.recv(MAX_COMMAND)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode("ascii", "replace").strip()


# client side --------------------------------------------------------------------
def ask(path: str, command: str, timeout: float = CONTROL_TIMEOUT) -> dict[str, Any] | None:
    """One worker's reply to `command`, or None if it is gone or does not answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return json.loads(b"".join(chunks))
    except (OSError, ValueError):
        return None
    finally:
        sock.close()


def worker_sockets(directory: str) -> list[str]:
    """The control sockets of the workers alive now (stale ones fail at `ask`)."""
    return sorted(str(p) for p in Path(directory).glob(WORKER_GLOB))
