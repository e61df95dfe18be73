"""Every process the suite starts, and the guarantee that it is stopped.

Invariants:
* Each child runs in its own session (process group), so stopping it also stops
  whatever it forked (nginx workers, haproxy threads, generator workers).
* No child outlives this process, even one killed with SIGKILL: each is started
  with `loadtest.reaper.guarded_popen`, whose watcher stops the groups still
  running once this process is gone (whichever thread started them).
* `Processes.stop_all()` runs on normal exit, on SIGINT/SIGTERM/SIGHUP (through
  `KeyboardInterrupt`, never lost: `Interrupts`) and from `atexit`; it is
  idempotent and bounded in time.
* Every child inherits ``LOADTEST_RUN_ID`` so a leak can be found from outside.
* A port picked for a child (`free_port`) stays held by this process (`HeldPort`)
  until it exits, so a child restarted on it finds it still free.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.reaper import guarded_popen, release

RUN_ID_ENV = "LOADTEST_RUN_ID"


class StartError(RuntimeError):
    """A process did not start or did not open its port in time."""


@dataclass
class Proc:
    """One started process: its name, Popen handle and log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def is_running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, limit: int = 600) -> str:
        """The end of the process's output, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-limit:].strip()


@dataclass
class Processes:
    """The registry of started processes for one run."""

    log_dir: Path
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        os.environ.setdefault(RUN_ID_ENV, self.run_id)
        self.run_id = os.environ[RUN_ID_ENV]
        atexit.register(self.stop_all)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        """Start `argv` in a new session with output to ``<log_dir>/<name>.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env[RUN_ID_ENV] = self.run_id
        with open(log_path, "ab") as log:
            try:
                popen = guarded_popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=full_env, start_new_session=True,
                )
            except OSError as exc:
                raise StartError(f"{name}: cannot start {argv[0]}: {exc}") from exc
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL it after `timeout` seconds."""
        stop_group(proc.popen, timeout)
        release(proc.popen)
        if proc in self.procs:
            self.procs.remove(proc)

    def kill(self, proc: Proc) -> None:
        """SIGKILL the process group at once (a crash, for failover)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.stop(proc, timeout=2.0)

    def stop_all(self) -> None:
        """Stop every process still registered (newest first)."""
        for proc in reversed(list(self.procs)):
            self.stop(proc, timeout=3.0)


def stop_group(popen: subprocess.Popen, timeout: float) -> None:
    """Terminate a child started with ``start_new_session`` and its group."""
    pgid = popen.pid
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=timeout)
    # The leader may be gone while its group lives on (nginx workers): kill the group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=timeout)


class HeldPort:
    """A loopback TCP port kept for a server this process starts: bound with
    SO_REUSEADDR, never listening, until `release`.

    While it is held (Linux, checked in tests/test_held_ports.py): no other bind
    to port 0 and no connection's source port gets it, and connecting to it is
    refused; yet a server that sets SO_REUSEADDR itself can listen there, stop,
    and listen there again (redis-server and sentinel, pebble and
    pebble-challtestsrv over TCP, nginx, haproxy, the balancer, gevent and
    socketserver servers all do). A server without SO_REUSEADDR gets
    EADDRINUSE, and UDP is not held at all. A port picked by binding to 0 and
    closing at once was free for anyone until its server bound it: under
    ``pytest -n 4`` another test's server could take it (and answer)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self.port: int = self._sock.getsockname()[1]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def release(self) -> None:
        """Give the port back to everyone (again: nothing)."""
        self._sock.close()

    def __enter__(self) -> HeldPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# the ports `free_port` holds until this process exits
_KEPT: list[HeldPort] = []


def free_port(host: str = "127.0.0.1") -> int:
    """A port for a server this process starts, held (`HeldPort`) until this
    process exits: for one run (``loadtest run``, a bench script), whose
    servers may stop and start again on it."""
    held = HeldPort(host)
    _KEPT.append(held)
    return held.port


def wait_for_port(proc: Proc, port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    """Wait until `port` accepts connections; StartError if `proc` dies or time runs out.
    With `port` from `free_port` no one else's bind to port 0 can have taken it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.is_running():
            raise StartError(f"{proc.name} exited with {proc.popen.returncode}: {proc.log_tail()}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise StartError(f"{proc.name} did not open {host}:{port} within {timeout:.0f}s: "
                     f"{proc.log_tail()}")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupts:
    """The signals that stop a run (Ctrl-C, SIGTERM, SIGHUP), each noted and then
    raised as `KeyboardInterrupt`, so cleanup runs the same way for all.

    Noted first because Python drops an exception raised while a finalizer runs
    (a `__del__`, a weakref callback: multiprocessing frees a generator's shared
    arrays so), printing "Exception ignored": the run went on and exited 0 (a
    loaded CI run). `check` raises a noted interrupt again (every step of a run
    calls it), and the run's exit status reads `received`."""

    def __init__(self) -> None:
        self.received: list[int] = []

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.interrupt)

    def interrupt(self, signum: int, frame: object) -> None:
        self.received.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    def check(self) -> None:
        """Raise KeyboardInterrupt if a stop signal came (its first raise may be lost)."""
        if self.received:
            raise KeyboardInterrupt(f"signal {self.received[0]}")
