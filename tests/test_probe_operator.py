"""Hostile probes of what an operator does to a running balancer, through real processes.

The config file caught by a reload while an editor writes it (empty), swapped
for something that is not a file (a FIFO, a device), or cut to a valid part
that drops the management token; and the management API under a low
descriptor limit flooded with half-sent requests. Each case ends with the
balancer serving, the API answering, and nothing opened that was closed.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest

from tests.support import ROOT, Balancer, replace_file, request, wait_for
from tests.test_descriptors import require_prlimit
from tests.test_process import children_of, info, wait_workers

HOST = "app.test"
TOKEN = "probe-operator-token-0123456789"
CONFIG = f'[server]\nworkers = 2\n[management]\ntoken = "{TOKEN}"\n'
KEPT = "SIGHUP: keeping the running settings"
# execs the rest of its command line without `--management ADDR` (a flag would
# outrank the config file's address, and a reload would then refuse on its own)
WITHOUT_MANAGEMENT_FLAG = [
    sys.executable, "-c", "import os, sys; a = sys.argv[1:]; i = a.index('--management'); "
    "del a[i:i + 2]; os.execv(a[0], a)"]


def routes(backend: Any) -> dict[str, Any]:
    return {HOST: {"action": "proxy", "backends": [backend.address]}}


def status_without_token(bal: Balancer, path: str = "/api/v1/hosts") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", bal.mport, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def generation(bal: Balancer) -> int:
    return bal.api("GET", "/api/v1/info", headers={"Authorization": f"Bearer {TOKEN}"}
                   )[1]["arbiter"]["generation"]


def refused_reload(bal: Balancer, why: str) -> str:
    """SIGHUP, then the line that says the running settings are kept (naming `why`)."""
    bal.proc.send_signal(signal.SIGHUP)
    return wait_for(lambda: next((line for line in bal.output().splitlines()
                                  if KEPT in line and why in line), None),
                    timeout=15, what=f"the refused reload ({why})")


# the config file under a reload ------------------------------------------------------
def test_a_reload_that_finds_the_config_file_empty_keeps_the_token(tmp_path, backend):
    """`cat > balancer.toml`, nano and vim with backupcopy=yes truncate the file,
    then write it: a SIGHUP in between (a path unit, a config manager) used to
    reload every default, the management token gone and the workers changed."""
    bal = Balancer(tmp_path, routes(backend), config=CONFIG)
    try:
        assert status_without_token(bal) == 401
        (tmp_path / "balancer.toml").write_text("")
        assert "empty" in refused_reload(bal, "balancer.toml")
        assert status_without_token(bal) == 401
        assert generation(bal) == 1
        assert request(bal.port, host=HOST)[0] == 200
        # a comment alone is a whole file: every default, as the message says
        (tmp_path / "balancer.toml").write_text("# defaults\n")
        bal.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: status_without_token(bal) == 200, timeout=20,
                 what="the reload to every default")
        assert "Traceback" not in bal.output()
    finally:
        bal.stop()


@pytest.mark.parametrize("swap", ["fifo", "/dev/zero", "huge"])
def test_a_config_file_swapped_for_a_fifo_a_device_or_a_huge_file_is_refused(
        tmp_path, backend, swap):
    """A FIFO held the arbiter in the reload's open() until something wrote to it;
    /dev/zero grew it without bound (1 GB in 3 s): neither stopped on SIGTERM."""
    bal = Balancer(tmp_path, routes(backend), config=CONFIG)
    config = tmp_path / "balancer.toml"
    try:
        config.unlink()
        if swap == "fifo":
            os.mkfifo(config)
        elif swap == "huge":
            config.write_text(CONFIG + "#" * (2 << 20) + "\n")
        else:
            config.symlink_to(swap)
        why = "larger than" if swap == "huge" else "not a regular file"
        refused_reload(bal, why)
        assert generation(bal) == 1
        assert request(bal.port, host=HOST)[0] == 200
        assert status_without_token(bal) == 401
    finally:
        assert bal.stop(timeout=15) == 0  # a SIGTERM answered: not stuck in the reload


def test_a_config_file_that_is_a_fifo_is_refused_at_start(tmp_path):
    """Started so, the arbiter waited in open() for a writer that never came."""
    os.mkfifo(tmp_path / "balancer.toml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALANCER_")}
    done = subprocess.run(
        [sys.executable, "-m", "balancer", "serve", "--config", str(tmp_path / "balancer.toml"),
         "--listen", "127.0.0.1:0", "--management", "127.0.0.1:0",
         "--store", f"file:{tmp_path / 'routes.json'}"],
        env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=20)
    assert done.returncode == 2, done.stderr
    assert "not a regular file" in done.stderr


def test_a_reload_never_leaves_a_non_loopback_management_api_without_a_token(
        tmp_path, backend):
    """The listen address needs a restart, so a reload keeps it; the token does
    not. A config file without the token (cut after its first section, or edited
    back to loopback for the next restart) reloaded the kept 0.0.0.0 listener
    with no token: the API open to the network (SPEC §5)."""
    config = '[management]\nlisten = "0.0.0.0:0"\n' + CONFIG.split("[management]\n")[1]
    bal = Balancer(tmp_path, routes(backend), config="[server]\nworkers = 2\n" + config,
                   prefix=WITHOUT_MANAGEMENT_FLAG)
    try:
        assert status_without_token(bal) == 401
        (tmp_path / "balancer.toml").write_text("[server]\nworkers = 2\n")
        line = refused_reload(bal, "management.token")
        assert "0.0.0.0" in line and "loopback" in line
        assert status_without_token(bal) == 401
        assert generation(bal) == 1
        assert "Traceback" not in bal.output()
    finally:
        bal.stop()


# the management API under a low descriptor limit -------------------------------------
def test_under_ulimit_n_64_a_flood_of_half_sent_requests_leaves_the_api_answering(
        tmp_path, backend):
    """The API's connection cap was the descriptor limit less the data plane's
    reserve: 0 under `ulimit -n 64`, so every connection (/healthz, balancerctl)
    was closed unanswered; and gevent accepted 100 connections per wake-up
    before any was displaced, out of descriptors with a traceback each time."""
    prlimit = require_prlimit()
    bal = Balancer(tmp_path, routes(backend), config="[server]\nworkers = 2\n",
                   prefix=[prlimit, "--nofile=64:64"])
    held: list[socket.socket] = []
    try:
        assert bal.api("GET", "/healthz")[0] == 200
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", bal.mport), timeout=5)
            sock.sendall(b"GET /api/v1/hosts HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            held.append(sock)
        assert bal.api("GET", "/healthz") == (200, {"status": "ok"})
        assert bal.api("GET", "/")[0] == 200
        env = {k: v for k, v in os.environ.items() if not k.startswith("BALANCER_")}
        listed = subprocess.run(
            [sys.executable, "-m", "management.ctl", "--url", f"http://127.0.0.1:{bal.mport}",
             "list"], env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
            timeout=30)
        assert listed.returncode == 0, listed.stderr
        assert HOST in listed.stdout
        assert bal.api("PUT", "/api/v1/hosts/w.test", {"action": "empty", "status": 204}
                       )[0] == 200
        assert request(bal.port, host="w.test")[0] == 204
        assert len(info(bal)["processes"]) == 2
        out = bal.output()
        assert "Traceback" not in out and "Too many open files" not in out
    finally:
        for sock in held:
            sock.close()
        bal.stop()


@pytest.mark.parametrize("which", ["management", "worker"])
def test_a_descriptor_limit_lowered_under_a_running_process_rests_its_accepts_quietly(
        tmp_path, backend, which):
    """`prlimit --pid=PID --nofile=40` on a running process, then a flood: gevent
    logged a traceback for every accept that ran out (26 in 2 s); the management
    API, its cap sized for the old limit, answered no operator until the flood
    timed out, and a worker's control socket logged the same tracebacks."""
    prlimit = require_prlimit()
    bal = Balancer(tmp_path, routes(backend))
    held: list[socket.socket] = []
    try:
        workers = set(wait_workers(bal, 1))
        management = next(pid for pid in children_of(bal.proc.pid) if pid not in workers)
        target, port = ((management, bal.mport) if which == "management"
                        else (next(iter(workers)), bal.port))
        subprocess.run([prlimit, f"--pid={target}", "--nofile=40:40"], check=True, timeout=10)
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Slow: ")
            held.append(sock)
        # the operator gets in (a head displaced), and the worker is asked
        assert bal.api("GET", "/healthz") == (200, {"status": "ok"})
        wait_for(lambda: "failed: Too many open files;" in bal.output(), timeout=15,
                 what="the accept that ran out to be told")
        if which == "worker":  # its control socket: asked, out of descriptors too
            bal.api("GET", "/api/v1/stats")
        for sock in held:
            sock.close()
        held.clear()
        wait_for(lambda: request(bal.port, host=HOST)[0] == 200, timeout=20,
                 what="the proxy after the flood")
        assert bal.api("GET", "/api/v1/stats")[0] == 200
        assert "failed with OSError" not in bal.output()
        assert bal.output().count("failed: Too many open files;") <= 2  # once per episode
    finally:
        for sock in held:
            sock.close()
        bal.stop()


def test_the_certificates_watch_out_of_descriptors_says_so_once_and_recovers(tmp_path):
    """`prlimit --pid` of the management process below the descriptors it holds:
    every file or socket it opens fails (EMFILE) until the limit is raised again.
    Bug: the certificates' watch logged a traceback, asking for a bug report."""
    prlimit = require_prlimit()
    bal = Balancer(tmp_path, {})
    try:
        workers = set(wait_workers(bal, 1))
        [management] = [pid for pid in children_of(bal.proc.pid) if pid not in workers]
        subprocess.run([prlimit, f"--pid={management}", "--nofile=3:"], check=True, timeout=10)
        replace_file(tmp_path / "routes.json.certs.json", '{"certs": {}}')  # (read: changed)
        spread = "certificates: handing the workers the certificates the store hides failed"
        wait_for(lambda: spread in bal.output(), timeout=10, what="the watch out of descriptors")
        subprocess.run([prlimit, f"--pid={management}", "--nofile=1024:"], check=True,
                       timeout=10)
        wait_for(lambda: "certificates are readable again" in bal.output(), timeout=15,
                 what="the watch recovered")
        assert bal.api("GET", "/api/v1/info")[1]["store"]["certs_problem"] is None
        out = bal.output()
        assert out.count(spread) == 1, out
        assert "Traceback" not in out and "please report" not in out, out
    finally:
        bal.stop()
