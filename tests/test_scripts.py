"""The benchmark scripts that need no outside programs still run (they are how
speed changes are measured, so they must not rot)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

ROOT = Path(__file__).resolve().parent.parent


def test_bench_hotpath_proxies_every_scripted_request() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hotpath.py"),
                          "--requests", "300"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    match = re.fullmatch(r"([\d.]+) µs per request \(best of 5 passes\)\n", out.stdout)
    assert match and float(match.group(1)) > 0


def test_bench_hotpath_varied_keep_alive_requests_are_all_answered() -> None:
    """--vary: a different target per request (the peer fails the run on a lost one)."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hotpath.py"),
                          "--sockets", "keep-alive", "--vary", "--requests", "100"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"[\d.]+ µs per request \(keep-alive, varied, real sockets, "
                        r"wall clock\)\n", out.stdout), out.stdout


@pytest.mark.parametrize("mode", ["keep-alive", "close"])
def test_bench_hotpath_tls_requests_are_all_answered(mode: str) -> None:
    """--tls: the worker's TLS listener (the peer fails the run on a lost answer)."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hotpath.py"),
                          "--sockets", mode, "--tls", "--requests", "50"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(rf"[\d.]+ µs per request \({mode}, TLS, real sockets, "
                        r"wall clock\)\n", out.stdout), out.stdout


def test_bench_hotpath_tls_refusing_fronting_proxies_every_request() -> None:
    """--refuse-fronting: every request passes the check and is proxied (a 421
    is no answer the peer counts)."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hotpath.py"),
                          "--sockets", "keep-alive", "--tls", "--refuse-fronting",
                          "--requests", "50"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"[\d.]+ µs per request \(keep-alive, TLS, refusing fronting, real "
                        r"sockets, wall clock\)\n", out.stdout), out.stdout


@pytest.mark.parametrize("mode, size, shown", [("keep-alive", "16K", "16,384"),
                                                ("close", "200", "200")])
def test_bench_hotpath_posts_bodies(mode: str, size: str, shown: str) -> None:
    """--body: POSTs with a Content-Length body the backend reads whole (the peer
    fails the run on a lost answer); the worker's CPU per request is shown too."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hotpath.py"),
                          "--sockets", mode, "--body", size, "--requests", "30"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(rf"[\d.]+ µs of worker CPU per request \(user \+ system\)\n"
                        rf"[\d.]+ µs per request \({mode}, POST body of {shown} bytes, "
                        r"real sockets, wall clock\)\n", out.stdout), out.stdout


@pytest.mark.parametrize("mode, chunk, shown", [("keep-alive", [], "16,384"),
                                                 ("close", ["1K"], "1,024")])
def test_bench_hotpath_posts_chunked_bodies(mode: str, chunk: list, shown: str) -> None:
    """--chunked: the same bodies chunked (the backend reads them to their last
    chunk: a body the balancer framed wrongly stalls the run, which then fails)."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hotpath.py"),
                          "--sockets", mode, "--body", "40K", "--chunked", *chunk,
                          "--requests", "20"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(rf"[\d.]+ µs of worker CPU per request \(user \+ system\)\n"
                        rf"[\d.]+ µs per request \({mode}, POST body of 40,960 bytes, "
                        rf"chunked by {shown}, real sockets, wall clock\)\n",
                        out.stdout), out.stdout
    missing = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hotpath.py"),
                              "--sockets", mode, "--chunked"], capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 2 and "--chunked needs --body" in missing.stderr


@pytest.mark.parametrize("size", ["16Q", "-1"])
def test_bench_hotpath_refuses_a_body_size_that_is_not_one(size: str) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hotpath.py"),
                          "--sockets", "keep-alive", f"--body={size}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "argument --body: invalid body_size value" in out.stderr, (
        out.returncode, out.stderr)


@pytest.mark.xdist_group("load_generators")  # one CPU-hungry run at a time (scripts/test.sh)
@pytest.mark.slow
def test_bench_limits_measures_both_phases_and_the_abuser_is_held_to_its_limit() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_limits.py"),
                          "--rounds", "1", "--duration", "3", "--clients", "4"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    phases = [json.loads(line) for line in out.stdout.splitlines()]
    assert [p.get("abuser") for p in phases[:2]] == [False, True]
    for phase in phases[:2]:
        assert phase["normal"]["statuses"] == {"200": 4 * 10 * 3}  # never limited
    abuser = phases[1]["abuser_load"]
    assert abuser["statuses"]["429"] > abuser["statuses"]["200"]
    summary = phases[2]
    assert summary["summary"] and summary["normal_p99_ms"]["without"] > 0
    assert 50 <= summary["abuser_passed_per_s"]["mean"] <= 150  # loose: a loaded machine


def test_bench_memory_reports_every_process_and_the_requests_in_flight() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_memory.py"),
                          "--in-flight", "20"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    roles = re.findall(r"^(arbiter|worker|management) +\d+: Rss +([\d.]+) MiB", out.stdout, re.M)
    assert sorted(role for role, _ in roles) == ["arbiter", "management", "worker"], out.stdout
    assert all(float(rss) > 5 for _, rss in roles)
    tree = re.search(r"^tree Pss ([\d.]+) MiB, Pss_Anon ([\d.]+), Private_Dirty ([\d.]+)$",
                     out.stdout, re.M)
    assert tree and float(tree[1]) >= float(tree[2]) > 0 and float(tree[3]) > 0, out.stdout
    assert re.search(r"with 20 requests in flight: -?[\d.]+ KiB each$", out.stdout, re.M)


def test_bench_hosts_poll_measures_plain_and_conditional_polls() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hosts_poll.py"),
                          "--hosts", "300", "--polls", "3"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert re.search(r'first answer 200, [\d.]+ MB, ETag "1"; If-None-Match answered \[304\], '
                     r"a stale one 200$", out.stdout, re.M), out.stdout
    rows = re.findall(r"^  (plain GET|If-None-Match|GET after|\d+ GETs at once).* ([\d.]+) ms "
                      r"CPU", out.stdout, re.M)
    assert [name for name, _ in rows] == ["plain GET", "If-None-Match", "GET after", "GET after",
                                          "8 GETs at once", "8 GETs at once"], out.stdout
    assert re.search(r"^  management process \d+: after the polls Rss [\d.]+ MiB, Pss [\d.]+ "
                     r"MiB", out.stdout, re.M), out.stdout


@pytest.mark.parametrize("load", ["file", "certs"])
def test_bench_big_load_measures_the_probe_while_loading(load: str) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_big_load.py"),
                          "--load", load, "--hosts", "300", "--certs", "3", "--rounds", "2"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    loads = 1 if load == "certs" else 2  # certificates loaded, then taken away
    assert re.search(rf"^{load}: .*, {loads} loads, one worker", out.stdout, re.M), out.stdout
    assert re.search(r"^  live request while loading: n [1-9]\d*  p50 [\d.]+  p99 [\d.]+  "
                     r"max [\d.]+ ms$", out.stdout, re.M), out.stdout
    assert re.search(r"^  load time: median [\d.]+ s \(.*\); the worker.s CPU: median [\d.]+ s",
                     out.stdout, re.M), out.stdout


def test_bench_names_connects_to_a_named_backend() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_names.py"),
                          "--connects", "100"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"[\d.]+ µs CPU per connect in turn, [\d.]+ µs 50 at once\n",
                        out.stdout), out.stdout


def test_bench_cert_startup_makes_its_missing_cache_directory(tmp_path: Path) -> None:
    """--cache names a directory that does not exist: made, and the certificates
    kept there (the run itself, a balancer started, is left out: seconds); one
    that cannot be made is a one-line error. Bug: a traceback
    (FileNotFoundError) after the certificates were made."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_cert_startup
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    cache = tmp_path / "new" / "cache"
    made = bench_cert_startup.cached_certs(1, cache)
    assert json.loads((cache / "bench-certs-1.json").read_text()) == made
    assert list(made["records"]) == ["h0.bench.test"]
    (tmp_path / "file").write_text("")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_cert_startup.py"),
                          "--certs", "1", "--cache", str(tmp_path / "file" / "cache")],
                         capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stderr) == (1, f"--cache {tmp_path}/file/cache: Not a directory\n")
    with pytest.raises(SystemExit, match="^--cache /proc/self: No such file or directory$"):
        bench_cert_startup.cached_certs(1, Path("/proc/self"))  # a directory, no file in it
