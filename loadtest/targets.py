"""Starting, checking and stopping the things a run measures.

Proxy targets: ``direct`` (the backend alone, the ceiling), ``gevent`` (the
balancer), ``threaded`` (the threaded baseline), ``haproxy`` and ``nginx``.
WSGI targets: ``gevent-wsgi`` and ``threaded-wsgi``. The backend is nginx
serving the page when nginx is installed, else the built-in gevent backend.

Invariants: every process is started through the run's `Processes` (so it is
stopped whatever happens), on a loopback port, with its files in its own
directory of the run dir; a target is timed only after `check` saw it answer
the exact page.
"""

from __future__ import annotations

import http.client
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from loadtest import configs
from loadtest.page import PAGE
from loadtest.procs import Proc, Processes, free_port, wait_for_port
from loadtest.routes import RouteApi, RouteFile, proxy_rule

HOST = "127.0.0.1"
PROXY_TARGETS = ("direct", "gevent", "threaded", "haproxy", "nginx")
WSGI_TARGETS = ("gevent-wsgi", "threaded-wsgi")
TOOLS = {"haproxy": "haproxy", "nginx": "nginx"}
# The balancer's default max_connections (10000) would pause accepts before the
# idle scenario's 10,000 held connections plus its live probe fit.
BALANCER_MAX_CONNECTIONS = 15000


class TargetError(RuntimeError):
    """A target did not start or answered wrongly (the message names it)."""


@dataclass
class Target:
    """A started target: where it listens and which process to measure."""

    name: str
    port: int
    proc: Proc | None
    routes: RouteFile | RouteApi | None = None
    extra: list[Proc] = field(default_factory=list)

    def url(self, path: str = "/") -> str:
        return f"http://{HOST}:{self.port}{path}"


# Debian installs nginx and haproxy in /usr/sbin, which a normal user's PATH lacks.
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def tool_path(tool: str) -> str | None:
    """The program `tool` on PATH or in the sbin directories; None when absent."""
    return shutil.which(tool) or shutil.which(tool, path=SBIN)


def _nginx_argv(dir: Path, conf: Path) -> list[str]:
    return [tool_path("nginx") or "nginx", "-p", str(dir), "-c", str(conf),
            "-e", str(dir / "error.log"), "-g", "daemon off;"]


def missing_tool(name: str) -> str | None:
    """Why target `name` cannot run here (None when it can)."""
    tool = TOOLS.get(name)
    if tool and tool_path(tool) is None:
        return f"{tool} is not installed"
    return None


@dataclass
class Lab:
    """Starts targets for one run; files go under ``run_dir/targets/``."""

    run_dir: Path
    procs: Processes
    nofile: int
    counter: int = 0

    @property
    def backend_kind(self) -> str:
        return "nginx" if tool_path("nginx") else "builtin"

    def _dir(self, label: str) -> Path:
        self.counter += 1
        path = self.run_dir / "targets" / f"{self.counter:02d}-{label}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start_backend(self, label: str = "backend", port: int | None = None,
                      delay: float = 0.0) -> Target:
        """A backend serving the page (nginx when installed, else built-in), on `port`
        (a free one by default); with a `delay` (seconds before each answer), the
        built-in one."""
        port = port or free_port()
        dir = self._dir(label)
        if delay:
            argv = [sys.executable, "-m", "loadtest.backend", "--listen", f"{HOST}:{port}",
                    "--delay", str(delay)]
        elif self.backend_kind == "nginx":
            conf = dir / "nginx.conf"
            conf.write_text(configs.nginx_backend(dir, port, PAGE, self._nofile()))
            argv = _nginx_argv(dir, conf)
        else:
            argv = [sys.executable, "-m", "loadtest.backend", "--listen", f"{HOST}:{port}"]
        return self._started(label, argv, port)

    def start_proxy(self, name: str, backends: list[Target]) -> Target:
        """Proxy target `name` in front of `backends` (direct: the first backend)."""
        if name == "direct":
            return Target("direct", backends[0].port, backends[0].proc)
        addrs = [f"{HOST}:{b.port}" for b in backends]
        port, dir = free_port(), self._dir(name)
        if name == "gevent":
            return self._balancer(dir, port, addrs)
        if name == "threaded":
            routes = RouteFile(dir / "routes.json", {"*": proxy_rule(addrs)})
            argv = [sys.executable, "-m", "loadtest.threaded", "--listen", f"{HOST}:{port}",
                    "--store", f"file:{routes.path}"]
            target = self._started(name, argv, port)
            target.routes = routes
            return target
        if name == "haproxy":
            conf = dir / "haproxy.cfg"
            # HAProxy reserves two descriptors per connection: under the same fd
            # limit as every other target it caps itself just under 10,000.
            maxconn = (self._nofile() - 100) // 2
            conf.write_text(configs.haproxy(port, addrs, self._nofile(), maxconn))
            argv = [tool_path("haproxy") or "haproxy", "-db", "-f", str(conf)]
            return self._started(name, argv, port)
        if name == "nginx":
            conf = dir / "nginx.conf"
            conf.write_text(configs.nginx_proxy(dir, port, addrs, self._nofile()))
            argv = _nginx_argv(dir, conf)
            return self._started(name, argv, port)
        raise TargetError(f"unknown proxy target {name!r}; expected one of {PROXY_TARGETS}")

    def _balancer(self, dir: Path, port: int, addrs: list[str]) -> Target:
        store = RouteFile(dir / "routes.json", {"*": proxy_rule(addrs)})
        mgmt = free_port()
        argv = [sys.executable, "-m", "balancer", "serve", "--listen", f"{HOST}:{port}",
                "--management", f"{HOST}:{mgmt}", "--store", f"file:{store.path}"]
        env = {"BALANCER_SERVER_MAX_CONNECTIONS": str(BALANCER_MAX_CONNECTIONS)}
        target = self._started("gevent", argv, port, env)
        wait_for_port(target.proc, mgmt, timeout=10)
        target.routes = RouteApi(HOST, mgmt)
        return target

    def start_wsgi(self, name: str) -> Target:
        """``gevent-wsgi`` or ``threaded-wsgi``."""
        if name not in WSGI_TARGETS:
            raise TargetError(f"unknown WSGI target {name!r}; expected one of {WSGI_TARGETS}")
        port = free_port()
        argv = [sys.executable, "-m", "loadtest.wsgiservers", "--kind", name.split("-")[0],
                "--listen", f"{HOST}:{port}"]
        return self._started(name, argv, port)

    def _started(self, name: str, argv: list[str], port: int,
                 env: dict[str, str] | None = None) -> Target:
        proc = self.procs.start(f"{name}-{port}", argv, env)
        try:
            wait_for_port(proc, port)
        except Exception as exc:
            self.procs.stop(proc)
            raise TargetError(f"{name}: {exc}") from exc
        return Target(name, port, proc)

    def _nofile(self) -> int:
        return max(1024, self.nofile - 100)

    def stop(self, target: Target) -> None:
        """Stop a target's processes (direct: nothing of its own)."""
        if target.name != "direct" and target.proc is not None:
            self.procs.stop(target.proc)


def fetch(port: int, host_header: str = "loadtest", timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET / on a fresh connection: (status, body)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Host": host_header})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def check(target: Target, timeout: float = 10.0) -> None:
    """Raise TargetError unless the target answers 200 with exactly the page."""
    deadline = time.monotonic() + timeout
    problem = "no answer"
    while time.monotonic() < deadline:
        try:
            status, body = fetch(target.port)
        except (OSError, http.client.HTTPException) as exc:
            problem = f"request failed: {exc}"
        else:
            if status == 200 and body == PAGE:
                return
            problem = (f"answered {status} with {len(body)} bytes instead of the "
                       f"{len(PAGE)}-byte page")
        time.sleep(0.2)
    raise TargetError(f"{target.name}: {problem}")
