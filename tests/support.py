"""Real-socket test harness: scripted backends, a balancer process, raw clients.

Everything binds to 127.0.0.1 on port 0; every wait polls with a deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

from loadtest.procs import HeldPort
from loadtest.reaper import guarded_popen, release

ROOT = Path(__file__).resolve().parent.parent
START_WAIT = 60.0  # seconds a test waits for a balancer it starts to listen


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> Any:
    """Poll `predicate` until it returns a truthy value or `timeout` passes."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # noqa: BLE001 - polled conditions may fail until ready
            last_exc = exc
        else:
            if value:
                return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (f" (last error: {last_exc!r})" if last_exc else ""))


def loop_until(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Let this process's gevent loop run until `predicate()` holds; its last value
    (falsy after `timeout` seconds)."""
    import gevent

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        gevent.sleep(0.005)
    return predicate()


def polls_during(build: Callable[[], object]) -> int:
    """Assert that this process's gevent loop polls while `build()` runs (not only
    switches to ready greenlets): a request that arrived on a socket and a timer
    that is due are both served before `build` returns. ``gevent.sleep(0)`` as the
    pause between a long job's slices serves neither (it ran up to 50 slices
    without polling). Returns how many times the loop went round meanwhile (each
    `balancer.turns.turn` is one round)."""
    import gevent
    import gevent.socket

    served: list[str] = []
    ready, peer = gevent.socket.socketpair()

    def reader() -> None:
        ready.recv(16)
        served.append("socket")

    waiting = gevent.spawn(reader)
    gevent.sleep(0.01)  # it blocks in recv (nothing else runs the hub below)
    assert not served
    peer.sendall(b"GET")  # a request arrives
    loop = gevent.get_hub().loop
    due = loop.timer(0)
    due.start(served.append, "timer")
    try:
        before = loop.iteration
        build()  # not a greenlet: the hub runs only at its pauses
        assert sorted(served) == ["socket", "timer"], served
        return int(loop.iteration - before)
    finally:
        due.stop()
        waiting.kill()
        ready.close()
        peer.close()


# scripted backends -------------------------------------------------------------
class EchoHandler(BaseHTTPRequestHandler):
    """Answers with JSON describing the request; paths script misbehaviour."""

    protocol_version = "HTTP/1.1"
    server_version = "TestBackend"

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.server.owner.connections.add(self.connection)  # type: ignore[attr-defined]

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner.connections.discard(self.connection)  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self.dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def do_HEAD(self) -> None:
        self.dispatch(head=True)

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            pieces = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return b"".join(pieces)
                pieces.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        digest = hashlib.sha256()
        remaining = length
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
        self._body_len, self._body_sha = length - remaining, digest.hexdigest()
        return b""

    def dispatch(self, head: bool = False) -> None:
        server: Backend = self.server.owner  # type: ignore[attr-defined]
        server.count += 1
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self._body_len, self._body_sha = 0, hashlib.sha256().hexdigest()
        body = self.read_body()
        if body:
            self._body_len, self._body_sha = len(body), hashlib.sha256(body).hexdigest()
        server.requests.append((self.command, self.path, dict(self.headers.items())))
        action = url.path.strip("/").split("/")[0]
        handler = getattr(self, f"act_{action}", None)
        if handler is not None:
            handler(query, head)
            return
        self.reply(200, self.describe(), head)

    def describe(self) -> bytes:
        server: Backend = self.server.owner  # type: ignore[attr-defined]
        return json.dumps({"backend": server.name, "method": self.command, "path": self.path,
                           "headers": dict(self.headers.items()), "body_len": self._body_len,
                           "body_sha": self._body_sha}).encode()

    def reply(self, status: int, body: bytes, head: bool = False,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def act_slow(self, query: dict[str, str], head: bool) -> None:
        time.sleep(float(query.get("s", "1")))
        self.reply(200, self.describe(), head)

    def act_hold(self, query: dict[str, str], head: bool) -> None:
        """A slow request that takes as long as the test needs: answered once the
        backend's `released` is set (or it stops), `s` seconds at most (30)."""
        server: Backend = self.server.owner  # type: ignore[attr-defined]
        server.released.wait(float(query.get("s", "30")))
        self.reply(200, self.describe(), head)

    def act_status(self, query: dict[str, str], head: bool) -> None:
        code = int(urlsplit(self.path).path.split("/")[2])
        self.reply(code, b"" if code in (204, 304) else self.describe(), head)

    def act_big(self, query: dict[str, str], head: bool) -> None:
        size = int(query.get("n", "1000"))
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        block = b"x" * (1 << 16)
        while size > 0 and not head:
            self.wfile.write(block[:min(size, len(block))])
            size -= len(block)

    def act_chunked(self, query: dict[str, str], head: bool) -> None:
        pieces = int(query.get("pieces", "3"))
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(pieces):
            data = f"piece{i};".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def act_eof(self, query: dict[str, str], head: bool) -> None:
        """A close-delimited body (no Content-Length, no chunking)."""
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"until-close")
        self.close_connection = True

    def act_drop(self, query: dict[str, str], head: bool) -> None:
        """Close the connection without answering."""
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


POLL = 0.02  # seconds between a backend's checks for `stop` (socketserver's default: 0.5)


# what a backend's write raises when its client (the balancer) has left: a
# timeout, a client abort or a retry gave up on the answer
CLIENT_LEFT = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class BackendServer(ThreadingHTTPServer):
    # the listen queue: socketserver's 5 drops the connects of a burst
    request_queue_size = 1024

    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver prints every handler's exception with its traceback: a
        client that left is routine (and was noise in the CI log), anything else
        is printed."""
        if not isinstance(sys.exc_info()[1], CLIENT_LEFT):
            super().handle_error(request, client_address)


class Backend:
    """A threaded HTTP/1.1 backend on 127.0.0.1:0 that echoes requests as JSON."""

    def __init__(self, name: str = "b", handler: type[BaseHTTPRequestHandler] = EchoHandler,
                 port: int = 0, server: type[BackendServer] = BackendServer,
                 host: str = "127.0.0.1") -> None:
        self.name = name
        self.host = host
        self.count = 0
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.connections: set[socket.socket] = set()  # open client connections (EchoHandler)
        self.released = threading.Event()  # answers the requests held on `/hold`
        self.httpd = server((host, port), handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        # a short poll: `stop` (socketserver's shutdown) waits for the loop to notice
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(POLL,),
                                       daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def kill(self) -> None:
        """Stop as a crashed process would: refuse new connections, cut open ones."""
        self.stop()
        for conn in list(self.connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def replace_file(path: Path, data: bytes | str) -> None:
    """Give `path` new contents atomically (a copy beside it renamed over it, as
    ``mv`` does), keeping its mode. `Path.write_bytes` truncates first: a balancer
    looking in between reads an empty file, one more damage to report (the log
    says each distinct problem once), which a test counting log lines must avoid."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    tmp = path.with_name(path.name + ".replacing")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


def in_threads(count: int, call: Callable[[], Any]) -> list[Future]:
    """Start `call` `count` times at once, each in its own thread; their futures."""
    pool = ThreadPoolExecutor(max_workers=count)
    futures = [pool.submit(call) for _ in range(count)]
    pool.shutdown(wait=False)
    return futures


# the ports of `dead_address`es, held until this process exits
_DEAD: list[HeldPort] = []


def dead_address() -> str:
    """An address where nothing listens (connections are refused): its port
    stays held (`HeldPort`), so no other bind to port 0 and no connection's
    source port takes it (a port closed at once was free for anyone: under
    `pytest -n 4` another test's backend came to listen there, and answered)."""
    _DEAD.append(HeldPort())
    return _DEAD[-1].address


def revive_port(address: str) -> int:
    """The port of the `dead_address` `address`, for a server to listen on now:
    one that sets SO_REUSEADDR (as `Backend` does) listens beside the holder,
    which keeps the port from everyone else before, meanwhile and after."""
    return int(address.rsplit(":", 1)[1])


# /metrics ----------------------------------------------------------------------
# every sample: {(name, its labels sorted): value}
Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Series:
    """Every sample of Prometheus text (`/metrics`), read by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(series: Series, name: str, **labels: str) -> float:
    """The value of the sample `name` with exactly `labels`; AssertionError naming
    it when there is none."""
    key = (name, tuple(sorted(labels.items())))
    assert key in series, f"{name}{labels or ''} not in /metrics"
    return series[key]


# the balancer ------------------------------------------------------------------
LISTEN_RE = re.compile(r"listening on (\S+) for (proxy|internal|tls|management)")


class Balancer:
    """`balancer serve` in a subprocess with a file store in `tmp` (or `store`, a URL;
    ``""``: none on the command line, the config names it, and a reload may change
    it); `prefix` is a command that execs it (``["prlimit", "--nofile=256"]``)."""

    def __init__(self, tmp: Path, hosts: dict[str, Any] | None = None, *,
                 args: list[str] | None = None, env: dict[str, str] | None = None,
                 internal: bool = False, config: str | None = None,
                 prefix: list[str] | None = None, listen: str = "127.0.0.1:0",
                 store: str | None = None) -> None:
        self.tmp = tmp
        self.routes = tmp / "routes.json"
        if hosts is not None:
            self.write_routes(hosts)
        argv = [*(prefix or []), sys.executable, "-m", "balancer", "serve",
                "--listen", listen, "--management", "127.0.0.1:0"]
        if store != "":
            argv += ["--store", store or f"file:{self.routes}"]
        if internal:
            argv += ["--internal-listen", "127.0.0.1:0"]
        if config:
            path = tmp / "balancer.toml"
            path.write_text(config)
            argv += ["--config", str(path)]
        argv += args or []
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("BALANCER_")}
        full_env.update(env or {})
        full_env["PYTHONPATH"] = str(ROOT)
        self.log_path = tmp / "balancer.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        # stopped by loadtest.reaper's watcher if this process dies first (a bench
        # script or a test run killed with SIGKILL)
        self.proc = guarded_popen(argv, cwd=tmp, stdout=self.log, stderr=subprocess.STDOUT,
                                  env=full_env)
        self.ports: dict[str, int] = {}
        try:
            # (ends when it listens, or at once when it exits: the bound only catches a
            # start that hangs; 20 s fell short for 7 starts on a machine at load 30)
            wait_for(self._read_ports, timeout=START_WAIT, what="balancer to listen")
        except BaseException:  # never left running by a test that failed here (bug: a
            self.stop(signal.SIGKILL)  # balancer hung at its start outlived the run)
            raise

    def _read_ports(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"balancer exited {self.proc.returncode}:\n{self.output()}")
        for address, kind in LISTEN_RE.findall(self.output()):
            self.ports.setdefault(kind, int(address.rsplit(":", 1)[1]))
        return "proxy" in self.ports and "management" in self.ports

    @property
    def port(self) -> int:
        return self.ports["proxy"]

    @property
    def mport(self) -> int:
        return self.ports["management"]

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def write_routes(self, hosts: dict[str, Any], version: int | None = None) -> None:
        """Replace the routes file atomically (as the file store does)."""
        if version is None:
            try:
                version = json.loads(self.routes.read_text())["version"] + 1
            except (OSError, ValueError, KeyError):
                version = 1
        tmp = self.routes.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": version, "hosts": hosts}))
        os.replace(tmp, self.routes)

    def store_up(self) -> float:
        """`balancer_store_up` (1: the store answered its last read, 0: not)."""
        return metric(self.metrics(), "balancer_store_up")

    def store_problem(self) -> str:
        """The store problem the management API reports ("" when none)."""
        return self.api("GET", "/api/v1/info")[1]["store"]["problem"] or ""

    def api(self, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.mport, timeout=10)
        data = json.dumps(body).encode() if body is not None else None
        sent = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers={**sent, **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw

    def metrics_text(self) -> str:
        """`/metrics` as text (answered 200)."""
        status, body = self.api("GET", "/metrics")
        assert status == 200, (status, body)
        return body.decode()

    def metrics(self) -> Series:
        """`/metrics`' samples (`samples`)."""
        return samples(self.metrics_text())

    def host_stats(self, host: str) -> dict[str, Any]:
        """The `/api/v1/stats` entry of one host ({} before its first request)."""
        return self.api("GET", "/api/v1/stats")[1]["hosts"].get(host, {})

    def spinning(self, host: str) -> int:
        """How many requests for `host` are held (spin or spin_when_down) now."""
        return self.host_stats(host).get("spinning", 0)

    def version(self) -> int:
        return self.api("GET", "/api/v1/stats")[1]["routing_version"]

    def wait_version(self, version: int, timeout: float = 10.0) -> None:
        wait_for(lambda: self.version() >= version, timeout, what=f"routing version {version}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        release(self.proc)
        self.log.close()
        return self.proc.returncode



def constants_prefix(values: dict[str, float], slow: dict[str, float] | None = None,
                     fail: tuple[list[str], Path] | None = None,
                     count: tuple[list[str], Path] | None = None) -> list[str]:
    """A `Balancer` prefix that starts it with module constants replaced
    (tests/set_constants/sitecustomize.py), e.g.
    ``{"management.history.INTERVAL": 1.0}``: the same code on a shorter clock;
    the functions named in `slow` made to sleep that many seconds first; with
    `fail` (``(["module:Class.method"], FLAG)``) those raising while FLAG exists;
    and with `count` (``(["module:Class.method"], PATH)``) each call of those
    noted in PATH (`calls`)."""
    def joined(named: dict[str, float]) -> str:
        return ";".join(f"{name}={value}" for name, value in named.items())

    calls, flag = fail if fail is not None else ([], Path("/nonexistent"))
    counted, into = count if count is not None else ([], Path("/nonexistent"))
    return ["env", f"PYTHONPATH={ROOT}{os.pathsep}{ROOT / 'tests' / 'set_constants'}",
            f"SET_CONSTANTS={joined(values)}", f"SLOW_CALLS={joined(slow or {})}",
            f"FAIL_CALLS={';'.join(calls)}", f"FAIL_WHILE={flag}",
            f"COUNT_CALLS={';'.join(counted)}", f"COUNT_INTO={into}"]


def calls(path: Path) -> Counter[int]:
    """The calls `constants_prefix`'s `count` noted in `path`, by process id."""
    try:
        return Counter(int(line) for line in path.read_text().split())
    except FileNotFoundError:
        return Counter()


def more_calls(path: Path, turns: int, what: str, processes: int = 1) -> None:
    """Wait until `processes` processes have each made `turns` more of the calls
    noted in `path` (a loop's next turns) than so far (none, for one that has made
    none yet)."""
    before = calls(path)

    def turned() -> bool:
        now = calls(path)
        return sum(n >= before[pid] + turns for pid, n in now.items()) >= processes

    wait_for(turned, 30.0, what=f"{turns} more calls of {what} in {processes} process(es)")

def control_socket(pid: int) -> str:
    """The path of worker `pid`'s control socket (in the balancer's run directory)."""
    with open("/proc/net/unix") as table:
        for line in table:
            path = line.split()[-1]
            if path.endswith(f"/worker-{pid}.sock"):
                return path
    raise AssertionError(f"no control socket for worker {pid}")


# clients -----------------------------------------------------------------------
def request(port: int, method: str = "GET", path: str = "/", host: str = "app.test",
            body: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; returns (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    all_headers = {"Host": host, **(headers or {})}
    conn.request(method, path, body=body, headers=all_headers)
    resp = conn.getresponse()
    data = resp.read()
    result = resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    conn.close()
    return result


def raw_exchange(port: int, data: bytes, timeout: float = 5.0, until_close: bool = True) -> bytes:
    """Send raw bytes, read until the server closes (or `timeout`)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not until_close:
                break
        return b"".join(chunks)
    finally:
        sock.close()


CANONICAL_SIZE = re.compile(rb"(0|[1-9a-fA-F][0-9a-fA-F]*)\r\n")


def unchunk(framed: bytes) -> bytes:
    """The data of a chunked body as the balancer forwards it, read strictly: every
    size line canonical (hex digits, no leading zero, no extension, CRLF), each
    chunk's data followed by CRLF, the last chunk's trailer lines, the empty line,
    and nothing after. AssertionError for anything else."""
    data, at = [], 0
    while True:
        line = CANONICAL_SIZE.match(framed, at)
        assert line, f"not a canonical size line at {at}: {framed[at:at + 40]!r}"
        size = int(line.group(1), 16)
        at = line.end()
        if not size:
            break
        data.append(framed[at:at + size])
        assert framed[at + size:at + size + 2] == b"\r\n", f"no CRLF after the chunk at {at}"
        at += size + 2
    while (end := framed.find(b"\r\n", at)) > at:  # trailer fields
        at = end + 2
    assert end == at and end + 2 == len(framed), f"bytes after the body: {framed[at:]!r}"
    return b"".join(data)


def split_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream of Content-Length framed responses."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        out.append((status, headers, rest[:length]))
        data = rest[length:]
    return out


class TableStore:
    """The part of the store interface an in-process worker uses: `hosts` as
    version `version` (tests that build a `balancer.worker` Worker themselves)."""

    display_url = "test"

    def __init__(self, hosts: dict[str, Any]) -> None:
        self.hosts = hosts
        self.version = 1

    def load(self) -> SimpleNamespace:
        return SimpleNamespace(version=self.version, hosts=self.hosts)

    def identity(self) -> str:
        return self.display_url

    def raise_floor(self, version: int) -> None:
        pass

    def close(self) -> None:
        pass


class ScriptedHealth:
    """Stands in for a pool `Backend` as a `BackendStats.source`: its health state
    ("up", "probing", "down") and its problem are scripted."""

    def __init__(self, state: str, problem: str = "") -> None:
        self.state = state
        self.problem = problem

    def health_state(self) -> str:
        return self.state

    def health_problem(self) -> str:
        return self.problem


# what an in-process worker's requests may take, unless a test says otherwise
WORKER_TIMEOUTS = {"timeouts.client_idle": 5.0, "timeouts.client_header": 0.6,
                   "timeouts.backend_read": 3.0}


class InProcessWorkers:
    """gevent workers (`balancer.server.Worker`) built in the test's own process,
    each on a fresh loopback listener (`kind`: False plain, "tls") with its
    watchdog running, its access log started when the settings name one;
    `close` stops them all."""

    def __init__(self) -> None:
        self.made: list[tuple[Any, Any]] = []

    def start(self, store: Any, flags: dict[str, Any], kind: Any = False) -> Any:
        import gevent

        from balancer.accepting import bind
        from balancer.addr import parse_addr
        from balancer.server import Worker
        from balancer.settings import load_settings

        settings = load_settings(flags={**WORKER_TIMEOUTS, **flags},
                                 env={"BALANCER_STORE_SNAPSHOT": "off"})
        w = Worker(settings, store)
        assert w.apply(w.store.load())
        w.listen([(bind(parse_addr("127.0.0.1:0")), kind)])
        if "log.access_log" in flags:
            w.access_log.start()
        self.made.append((w, gevent.spawn(w.watchdog_loop)))
        return w

    def stop_watchdog(self, w: Any) -> None:
        """Tell worker `w` to stop and wait until its watchdog has ended (it takes no
        further tick: `balancer.restarts.every`)."""
        w.stopping = True
        for made, watchdog in self.made:
            if made is w:
                watchdog.join(timeout=5)
                assert watchdog.dead, "the watchdog did not end"

    def close(self) -> None:
        for w, watchdog in self.made:
            w.stopping = True
            for server in w.servers:
                server.close()
            watchdog.join(timeout=5)


def acquire(backend: Any) -> tuple[Any, bool]:
    """(connection, reused) of a `balancer.pool.Backend`: an idle one, else a new one,
    as a request's `balancer.relay._take` does (without its deadline)."""
    idle = backend.acquire_idle()
    return (idle, True) if idle is not None else (backend.connect(), False)


def listening_inodes(port: int) -> set[int]:
    """Inodes of the sockets listening on TCP `port` (any address)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(int(fields[9]))
    return found


def holders(inode: int, pids: list[int]) -> set[int]:
    """Which of `pids` hold the socket `inode` open."""
    target = f"socket:[{inode}]"
    held = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == target:
                    held.add(pid)
                    break
            except OSError:
                continue
    return held
