"""`balancer serve` start-up: bad settings and addresses, IPv6, the embedded default."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from tests.support import ROOT, Backend, Balancer, request


def run_serve(args: list[str], tmp_path, env: dict[str, str] | None = None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BALANCER_")}
    full_env.update(env or {}, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "balancer", "serve", *args], cwd=tmp_path,
                          env=full_env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("args,env,named", [
    (["--listen", "nonsense"], {}, "server.listen"),
    (["--workers", "-1"], {}, "server.workers"),
    ([], {"BALANCER_TIMEOUTS_BACKEND_READ": "abc"}, "timeouts.backend_read"),
    ([], {"BALANCER_TIMEOUTS_NOPE": "1"}, "BALANCER_TIMEOUTS_NOPE"),
    (["--store", "ftp://x"], {}, "store.url"),
    (["--management", "0.0.0.0:0"], {}, "management.listen"),
    (["--config", "/nonexistent.toml"], {}, "nonexistent.toml"),
])
def test_bad_settings_exit_naming_the_setting(tmp_path, args, env, named):
    result = run_serve(args, tmp_path, env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("balancer: ") for line in lines)
    assert named in result.stderr


def test_unbindable_listener_exits_naming_it(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = run_serve(["--listen", f"127.0.0.1:{port}", "--management", "127.0.0.1:0",
                            "--store", f"file:{tmp_path}/r.json"], tmp_path)
    finally:
        taken.close()
    assert result.returncode == 1
    assert f"server.listen: cannot listen on 127.0.0.1:{port}" in result.stderr


def test_a_taken_management_address_names_its_setting(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = run_serve(["--listen", "127.0.0.1:0", "--management", f"127.0.0.1:{port}",
                            "--store", f"file:{tmp_path}/r.json"], tmp_path)
    finally:
        taken.close()
    assert result.returncode == 1
    assert (f"balancer: management.listen: cannot listen on 127.0.0.1:{port}: Address already "
            f"in use (another process listens there: stop it, or give another address: "
            f"--management, BALANCER_MANAGEMENT_LISTEN, [management] listen)") in result.stderr


def test_bad_config_file_value(tmp_path):
    config = tmp_path / "b.toml"
    config.write_text('[timeouts]\nclient_idle = "soon"\n')
    result = run_serve(["--config", str(config)], tmp_path)
    assert result.returncode == 2 and "timeouts.client_idle" in result.stderr


def test_ipv6_listener(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    backend = Backend("v6")
    bal = Balancer(tmp_path, {"*": {"action": "proxy", "backends": [backend.address]}},
                   args=["--listen", "[::1]:0"])
    try:
        v6_ports = [int(port) for port in
                    re.findall(r"listening on \[::1\]:(\d+) for proxy", bal.output())]
        assert v6_ports
        sock = socket.create_connection(("::1", v6_ports[0]), timeout=5)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        sock.close()
        assert data.startswith(b"HTTP/1.1 200") and b'"backend": "v6"' in data
        assert request(bal.port, host="x")[0] == 200
    finally:
        bal.stop()
        backend.stop()


def test_default_store_created_empty(tmp_path):
    """With no store flag, `balancer-routes.json` is created and no-hosts (503) served."""
    bal = Balancer(tmp_path, None, store="")  # bug: the test named the default itself
    try:
        assert json.loads((tmp_path / "balancer-routes.json").read_text()) == {
            "version": 0, "hosts": {}}
        assert request(bal.port, host="any.test")[0] == 503
    finally:
        bal.stop()


@pytest.mark.parametrize("module, prog", [("balancer", "balancer"),
                                          ("management.ctl", "balancerctl")])
def test_version_prints_the_running_codes_version_and_where_it_is(tmp_path, module, prog):
    """`--version`, as `haproxy -v`, `nginx -v` and `traefik version` answer it (a bug
    report, a deploy script checking what runs), of the code that runs: a source tree
    run with PYTHONPATH beside the installed package. Bug: it printed the installed
    package's version whatever ran; the lookup costs the arbiter nothing."""
    import shutil

    for package in ("balancer", "management"):
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "balancer" / "__init__.py").write_text('__version__ = "9.8.7"\n')
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                          text=True, timeout=30, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert (done.returncode, done.stdout, done.stderr) == (
        0, f"{prog} 9.8.7 from {tmp_path / 'balancer'} (python {python})\n", "")


def test_the_packages_version_is_balancers_own():
    """pyproject.toml takes the version from `balancer.__version__` (one source)."""
    import tomllib

    import balancer

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "balancer.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", balancer.__version__)


def test_the_collector_paused_for_the_start_is_on_again() -> None:
    """`balancer serve` pauses the garbage collector during its start-up's imports
    (`balancer.cli.main`); the first `freeze` turns it on (before any worker is
    forked), and `main` whatever ends it first (here: a settings error)."""
    import gc

    from balancer import cli
    from balancer.preload import freeze

    try:
        assert cli.main(["serve", "--workers", "x"]) == 2
        assert gc.isenabled()
        gc.disable()
        freeze()
        assert gc.isenabled()
    finally:  # (the test process's objects collectable again, whatever failed)
        gc.unfreeze()
        gc.enable()
