"""Shared pytest fixtures. Each group is kept together under its own header."""

from __future__ import annotations

# ---------------------------------------------------------------------------
# management (issue 4): a real redis-server, and a live WSGI app on port 0
# ---------------------------------------------------------------------------
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest.procs import HeldPort
from loadtest.reaper import guarded_popen, release

# fixtures shared by several test modules, as plugins (no import: a module that
# imported a fixture and named it as a parameter would redefine it, ruff F811)
pytest_plugins = ["tests.deploy_fixtures"]


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02,
               message: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def required_tool(command: str, package: str) -> str:
    """The path of `command`; skips the test when missing, fails when CI=true
    (scripts/test.sh installs `package` there)."""
    path = shutil.which(command)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{command} is required in CI (apt-get install {package})")
        pytest.skip(f"{command} is not installed ({package})")
    return path


def redis_binary() -> str:
    return required_tool("redis-server", "redis-server")


class RedisServer:
    """A redis-server process on a fixed port, persisting to an AOF in `directory`
    so it can be stopped and restarted with its data. The port is held
    (`HeldPort`: redis-server listens with SO_REUSEADDR beside it) until `close`,
    so no other test's server takes it while this one is stopped."""

    def __init__(self, directory: Path) -> None:
        self.binary = redis_binary()
        self.directory = directory
        self.held = HeldPort()
        self.port = self.held.port
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *options: str, wait: bool = True) -> RedisServer:
        """Start (again) with its data; `options` are more redis-server flags
        (``"--replicaof", "127.0.0.1", "6379"``); `wait` for a PONG."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = guarded_popen(  # never outlives a killed test run
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.directory), "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--daemonize", "no",
             "--logfile", str(self.directory / "redis.log"), *options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait:
            wait_until(self.is_up, timeout=10, message=f"redis-server on port {self.port}")
        return self

    def is_up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
            raise AssertionError(f"redis-server exited {self.proc.returncode}: {log}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop it (SIGTERM, again every 0.25 s for 10 s at most: a redis-server
        refuses a shutdown while it writes its first AOF, "Writing initial AOF,
        can't exit", as a replica does right after its sync, and does not try
        again by itself; a stop just after `replica_pair` hung 10 s)."""
        deadline = time.monotonic() + 10
        while self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    raise
        if self.proc is not None:
            release(self.proc)
        self.proc = None

    def close(self) -> None:
        """Stop for good: the port is given back."""
        self.stop()
        self.held.release()

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=5)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; tests isolate themselves by namespace."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Start private redis-servers (for tests that stop or restart them)."""
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        servers.append(RedisServer(tmp_path / f"redis{len(servers)}"))
        return servers[-1].start()
    yield make
    for server in servers:
        server.close()


@pytest.fixture
def replica_pair(redis_factory: Callable[[], RedisServer]
                 ) -> tuple[RedisServer, RedisServer]:
    """``master, replica``: two private redis-servers, the replica synced."""
    master = redis_factory()
    master.client().config_set("repl-diskless-sync-delay", 0)  # (5 s by default) a sync at once
    replica = redis_factory()
    replica.stop()
    replica.start("--replicaof", "127.0.0.1", str(master.port))
    acknowledging(master, 1)
    return master, replica


def acknowledging(master: RedisServer, replicas: int, timeout: float = 10.0) -> None:
    """Wait until `replicas` replicas of `master` acknowledge a write (``WAIT``),
    `timeout` seconds at most. A replica's link is "up" before the master counts
    it: a master puts a replica just synced online at its first ``REPLCONF ACK``,
    so a ``WAIT`` right after the link came up could answer 0 (a test's first
    write then got 503 store_not_replicated on a loaded machine)."""
    client = master.client()
    try:
        wait_until(lambda: client.set("tests:acknowledging", 1)
                   and client.execute_command("WAIT", replicas, 100) >= replicas,
                   timeout=timeout, message=f"{replicas} replica(s) of port {master.port} "
                                            f"acknowledging a write")
    finally:
        client.close()


@pytest.fixture
def sentinel_pair(replica_pair: tuple[RedisServer, RedisServer], tmp_path: Path
                  ) -> Iterator[tuple[RedisServer, RedisServer, Any, str]]:
    """``master, replica, sentinel client, store URL``: one sentinel (service ``mm``)
    watching a master and its synced replica."""
    import redis

    master, replica = replica_pair
    with HeldPort() as held:  # the sentinel listens beside it (SO_REUSEADDR)
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"port {held.port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                        f"sentinel monitor mm 127.0.0.1 {master.port} 1\n"
                        "sentinel down-after-milliseconds mm 1000\n"
                        "sentinel failover-timeout mm 5000\n")
        sentinel = guarded_popen([master.binary, str(conf), "--sentinel"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=held.port, decode_responses=True, socket_timeout=5)
        try:
            wait_until(lambda: _sees_replica(client), timeout=10,
                       message="the sentinel seeing the replica")
            yield master, replica, client, f"redis+sentinel://{held.address}/mm/0"
        finally:
            client.close()
            sentinel.terminate()
            sentinel.wait(10)
            release(sentinel)


def write_stored(status: int, answer: Any) -> bool:
    """A write's answer says it is stored: 200, or 202 with the workers that did not
    confirm it within ``apply_timeout`` in ``lagging`` (docs/api.md: they catch up
    by themselves; a loaded machine, a worker following a failover). Either must
    survive; a refusal is anything else."""
    return status == 200 or (status == 202 and bool(answer.get("lagging")))


def failover_during_a_burst(bal: Any, sentinel: Any, replica: RedisServer
                            ) -> tuple[list[str], set[str], list[tuple[int, Any]]]:
    """One-host PUTs of ``h0.test``, ``h1.test``... (each serving its own name) back
    to back through the balancer `bal`, and ``SENTINEL FAILOVER`` once 10 were
    stored; the writes stop at the fifth refusal (or the 600th write). Once the
    sentinels name `replica`: the hosts stored (`write_stored`: 200, or 202 naming a
    lagging worker), those answered 202, and the refusals (status, answer)."""
    answered: list[str] = []
    lagged: set[str] = set()
    refused: list[tuple[int, Any]] = []

    def burst() -> None:
        for n in range(600):
            status, answer = bal.api("PUT", f"/api/v1/hosts/h{n}.test",
                                     {"action": "static", "status": 200, "body": f"h{n}"})
            if write_stored(status, answer):
                answered.append(f"h{n}.test")
                if status == 202:
                    lagged.add(f"h{n}.test")
            else:
                refused.append((status, answer))
            if len(refused) >= 5:
                return
    writer = threading.Thread(target=burst)
    writer.start()
    wait_until(lambda: len(answered) >= 10, timeout=10, message="writes under way")
    assert sentinel.execute_command("SENTINEL", "FAILOVER", "mm") in (True, "OK", b"OK")
    writer.join(30)
    assert not writer.is_alive()
    wait_until(lambda: int(sentinel.sentinel_get_master_addr_by_name("mm")[1])
               == replica.port, timeout=10, message="the sentinels naming the replica")
    return answered, lagged, refused


def _sees_replica(client: Any) -> bool:
    try:
        return int(client.sentinel_master("mm")["num-slaves"]) >= 1
    except Exception:  # noqa: BLE001 - not up yet
        return False


class LiveWsgi:
    """A WSGI app served by gevent's pywsgi on 127.0.0.1 port 0 in its own thread
    (with its own gevent hub), so plain blocking clients can talk to it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._ready = threading.Event()
        self._server: Any = None
        self._hub: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import gevent
        from gevent.pywsgi import WSGIServer

        from management.server import RawTargetHandler  # (the target as sent, as served)

        self._server = WSGIServer(("127.0.0.1", 0), self.app, log=None,
                                  handler_class=RawTargetHandler)
        self._server.start()
        # pywsgi sends headers and body in two writes: without TCP_NODELAY (inherited
        # by accepted sockets) every keep-alive response waits ~40 ms on a delayed ACK
        self._server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._hub = gevent.get_hub()
        self._ready.set()
        self._server.serve_forever()

    def start(self) -> LiveWsgi:
        self._thread.start()
        assert self._ready.wait(10), "the WSGI server did not start"
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def stop(self) -> None:
        self._hub.loop.run_callback_threadsafe(self._server.stop)
        self._thread.join(10)


@pytest.fixture
def serve_wsgi() -> Iterator[Callable[[Any], str]]:
    """``url = serve_wsgi(app)``: serve a WSGI app on a real socket for this test."""
    servers: list[LiveWsgi] = []

    def serve(app: Any) -> str:
        server = LiveWsgi(app).start()
        servers.append(server)
        return server.url
    yield serve
    for server in servers:
        server.stop()


# ---------------------------------------------------------------------------
# the data plane: backends and balancers on loopback, stopped after the test
# ---------------------------------------------------------------------------
@pytest.fixture
def start_backend() -> Iterator[Callable[..., Any]]:
    """``backend = start_backend(name="a", handler=...)``: a `tests.support.Backend`."""
    from tests.support import Backend

    started: list[Backend] = []

    def start(name: str = "a", **kwargs: Any) -> Backend:
        started.append(Backend(name, **kwargs))
        return started[-1]
    yield start
    for backend in started:
        backend.stop()


@pytest.fixture
def held_port() -> Iterator[HeldPort]:
    """A `loadtest.procs.HeldPort` for this test: a server that stops and starts
    again on one port listens on ``held_port.port`` (``Backend(port=...)``), so
    no other test's server takes the port between the two."""
    with HeldPort() as held:
        yield held


@pytest.fixture
def backend(start_backend: Callable[..., Any]) -> Any:
    """One `tests.support.Backend` named "a"."""
    return start_backend("a")


@pytest.fixture
def proxy_to(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``bal = proxy_to(backend, host="app.test", **Balancer_options)``: a balancer
    (`tests.support.Balancer` in tmp_path) whose `host` proxies to `backend` (a
    `Backend`, a `tests.rawpeer.RawBackend`: anything with `address` and `stop`).
    Both are stopped after the test, the balancer first."""
    from tests.support import Balancer

    started: list[Any] = []

    def start(backend: Any, host: str = "app.test", **options: Any) -> Balancer:
        started.append(backend)
        bal = Balancer(tmp_path, {host: {"action": "proxy", "backends": [backend.address]}},
                       **options)
        started.append(bal)
        return bal
    yield start
    for peer in reversed(started):
        peer.stop()


# ---------------------------------------------------------------------------
# parallel runs (pytest-xdist, scripts/test.sh): shared fixtures, the longest first
# ---------------------------------------------------------------------------
SHARED_SCOPES = ("module", "class", "package")
SLOW_WEIGHT = 10  # a test marked `slow` (7 s or more) counts as this many others


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist (`--dist loadgroup`), the tests of a module that use one of its
    module-scoped (or class-scoped) fixtures run on one worker, one after the
    other (`xdist_group` named after the module, unless they name a group): one
    balancer, Chromium or pebble per module, where each of six workers started
    its own (and again whenever it came back from another module's tests). The
    work is then ordered longest first (a group by its tests, a `slow` test
    counting `SLOW_WEIGHT` or its mark's seconds; scripts/test.sh keeps that order with
    `--no-loadscope-reorder`), so no worker ends the run alone on a long group
    or test. Every worker sorts the same collection the same way, as xdist
    requires; a run in one process keeps each module's tests together (its
    module fixtures start once)."""
    if not hasattr(config, "workerinput"):  # not an xdist worker
        return
    for item in items:
        if item.get_closest_marker("xdist_group") is None and shares_a_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))  # type: ignore[attr-defined]
    weights: dict[str, int] = {}
    for item in items:
        weights[unit(item)] = weights.get(unit(item), 0) + weight(item)
    items.sort(key=lambda item: -weights[unit(item)])


def shares_a_fixture(item: pytest.Item) -> bool:
    """Whether `item` uses a fixture set up once for several tests of its module."""
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(
        definitions[-1].scope in SHARED_SCOPES for definitions in info.name2fixturedefs.values())


def unit(item: pytest.Item) -> str:
    """What xdist hands out whole: the test's group, else the test."""
    group = item.get_closest_marker("xdist_group")
    return f"@{group.args[0]}" if group is not None else item.nodeid


def weight(item: pytest.Item) -> int:
    """1 for a test; for one marked `slow`, its mark's seconds if it names them
    (``@pytest.mark.slow(60)``), else `SLOW_WEIGHT`."""
    slow = item.get_closest_marker("slow")
    return 1 if slow is None else int(slow.args[0]) if slow.args else SLOW_WEIGHT


# ---------------------------------------------------------------------------
# compiled modules (setup.py): never test a build older than its sources
# ---------------------------------------------------------------------------
def pytest_sessionstart(session: pytest.Session) -> None:
    from balancer import native

    old = native.stale()
    if old:
        pytest.exit(f"compiled modules older than their sources: {', '.join(old)}; "
                    f"run `pip install -e .` (or `BALANCER_PURE=1 pip install -e .`)", 2)
