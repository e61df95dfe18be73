"""`balancerctl` against a hostile or broken server at its --url: scripted raw
servers on loopback (`tests.rawpeer.RawBackend`) that redirect, flood, trickle,
break off, speak no HTTP, or hold a certificate nobody trusts. Each run ends
with one line on stderr and exit 1, and the token goes nowhere but --url."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from management.ctl import main
from management.ctl_client import MAX_ANSWER
from tests.rawpeer import RawBackend, Script, head_fields, sending, serve_each
from tests.tlsca import TestCA

REPO = Path(__file__).resolve().parent.parent
TOKEN = "ctl-token"
HOSTS = b'{"version": 1, "hosts": {}}'


def answer(body: bytes = HOSTS, status: str = "200 OK", head: str = "",
           content_type: str = "application/json") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: "
            f"{len(body)}\r\nConnection: close\r\n{head}\r\n").encode("latin-1") + body


@pytest.fixture
def serve() -> Iterator[Callable[..., RawBackend]]:
    """``server = serve(script, tls=None)``: a scripted server, stopped after the test."""
    started: list[RawBackend] = []

    def start(script: Script, **kwargs: object) -> RawBackend:
        started.append(RawBackend(script, **kwargs))  # type: ignore[arg-type]
        return started[-1]
    yield start
    for server in started:
        server.stop()


def fails(capsys: pytest.CaptureFixture[str], url: str, *argv: str) -> str:
    """The one stderr line of `balancerctl --url URL ARGV...` failing with exit 1."""
    assert main(["--url", url, "--token", TOKEN, *argv]) == 1
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("balancerctl: "), err
    assert out == ""
    return lines[0]


# 1. redirects ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("status", "argv"), [
    (301, ["list"]), (302, ["list"]), (303, ["get", "a.test"]), (307, ["list"]),
    (308, ["stats"]), (307, ["reload"]), (302, ["set", "a.test", "empty", "status=204"])])
def test_a_redirect_is_not_followed_and_the_token_goes_nowhere_else(
        serve: Callable[..., RawBackend], capsys: pytest.CaptureFixture[str],
        status: int, argv: list[str]) -> None:
    elsewhere = serve(sending(answer(b'{"version": 1, "hosts": {}, "host": "a.test", '
                                     b'"rule": {}, "next": null}')))
    location = f"http://{elsewhere.address}/api/v1/hosts"
    api = serve(sending(answer(b"<a>moved</a>", f"{status} Moved", f"Location: {location}\r\n",
                               "text/html")))
    line = fails(capsys, f"http://{api.address}", *argv)
    assert f"answered {status} Moved to {location}" in line, line
    assert "balancerctl does not follow redirects" in line and "--url" in line
    assert ("authorization", f"Bearer {TOKEN}") in head_fields(api.requests[0])
    assert elsewhere.inbound == b""  # (a followed redirect has been read before main returns)


# 2. answers too large -------------------------------------------------------------------------
def test_an_answer_announcing_more_than_the_cap_is_refused_unread(
        serve: Callable[..., RawBackend], capsys: pytest.CaptureFixture[str]) -> None:
    api = serve(sending(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 10000000000\r\n\r\n["))
    line = fails(capsys, f"http://{api.address}", "list")
    assert "its answer announces 10000000000 bytes, over the 256 MiB balancerctl reads" in line


def test_an_answer_as_large_as_the_largest_store_file_is_read(
        serve: Callable[..., RawBackend], capsys: pytest.CaptureFixture[str]) -> None:
    """`GET /api/v1/hosts` is about the size of the routes file it comes from (the
    same JSON, more compact), so a table the file store serves can be listed. Bug:
    tables from 128 to 256 MiB were served, and `balancerctl list` refused them."""
    from balancer.stores.atomic import MAX_FILE_BYTES

    api = serve(sending(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n[" % MAX_FILE_BYTES))
    line = fails(capsys, f"http://{api.address}", "list")
    assert "closed the connection in the middle of its answer" in line, line


def flood(conn: socket.socket, request: bytes) -> bool:
    """A chunked answer that goes on for 4 times the cap, or until the client leaves."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"100000\r\n" + b" " * (1 << 20) + b"\r\n"  # 1 MiB of JSON whitespace
    for _ in range(4 * MAX_ANSWER >> 20):
        conn.sendall(chunk)
    return False


def test_an_endless_answer_stops_at_the_cap(serve: Callable[..., RawBackend],
                                            tmp_path: Path) -> None:
    """Run as a process of its own, so that its peak memory is its own (`os.wait4`)."""
    api = serve(flood)
    with open(tmp_path / "err", "wb") as err:
        child = subprocess.Popen([sys.executable, "-m", "management.ctl", "--url",
                                  f"http://{api.address}", "list"], cwd=REPO,
                                 env={**os.environ, "PYTHONPATH": str(REPO)},
                                 stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    line = (tmp_path / "err").read_text()
    assert child.returncode == 1 and line.count("\n") == 1, line
    assert "its answer goes on past the 256 MiB balancerctl reads" in line, line
    peak_mib = usage.ru_maxrss / 1024  # (KiB on Linux)
    assert peak_mib < (MAX_ANSWER >> 20) + 150, f"peak {peak_mib:.0f} MiB"


# 3. time --------------------------------------------------------------------------------------
def trickle(head: bytes, byte: bytes) -> Script:
    """Writes `head`, then `byte` every 50 ms (for 20 s at most)."""
    def script(conn: socket.socket, request: bytes) -> bool:
        conn.sendall(head)
        for _ in range(400):
            conn.sendall(byte)
            time.sleep(0.05)
        return False
    return script


@pytest.mark.parametrize("script", [
    trickle(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n"
            b"\r\n", b" "),
    trickle(b"HTTP/1.1 200 OK\r\n", b"X"),  # a head line without end
    trickle(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n", b"1\r\n \r\n"),
], ids=["body", "head", "chunks"])
def test_a_trickling_server_is_left_at_the_deadline(
        serve: Callable[..., RawBackend], capsys: pytest.CaptureFixture[str],
        script: Script) -> None:
    api = serve(script)
    started = time.monotonic()
    line = fails(capsys, f"http://{api.address}", "--timeout", "0.5", "list")
    took = time.monotonic() - started
    assert "no whole answer within 0.5s (--timeout)" in line, line
    assert 0.45 < took < 4, took


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_server_that_never_answers_is_left_at_the_deadline(
        capsys: pytest.CaptureFixture[str], scheme: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as never:  # connects (backlog), never accepted
        started = time.monotonic()
        line = fails(capsys, f"{scheme}://127.0.0.1:{never.getsockname()[1]}", "--timeout",
                     "0.5", "list")
    assert "within 0.5s (--timeout)" in line, line
    assert time.monotonic() - started < 4


# 4. broken answers ----------------------------------------------------------------------------
def reset_after(piece: bytes) -> Script:
    def script(conn: socket.socket, request: bytes) -> bool:
        conn.sendall(piece)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return False  # closed with SO_LINGER 0: a reset
    return script


@pytest.mark.parametrize(("script", "named"), [
    (sending(), "closed the connection without answering"),
    (sending(HOSTS), "answered something that is not HTTP/1.x (it began '{\"version\""),
    (sending(b"HTTP/2.0 200 OK\r\n\r\n"), "not HTTP/1.x (it began 'HTTP/2.0')"),
    (sending(b"HTTP/1.1 abc OK\r\n\r\n"), "not HTTP/1.x (it began 'HTTP/1.1 abc OK"),
    (sending(answer()[:-10]), "closed the connection in the middle of its answer (17 bytes, "
                              "10 more announced)"),
    (reset_after(answer()[:-10]), "reset the connection before its answer was whole"),
    (sending(b"HTTP/1.1 200 OK\r\nX-Long: " + b"x" * 70000 + b"\r\n\r\n"),
     "a head line too long"),
    (sending(b"HTTP/1.1 200 OK\r\n" + b"X-Field: 1\r\n" * 101 + b"\r\n"),
     "answered with a broken head (got more than 100 headers)"),
    (sending(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
             b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"), "in the middle of its answer"),
], ids=["silent", "http0.9", "http2", "status", "short", "reset", "long-line", "fields",
        "chunk-size"])
def test_a_broken_answer_is_one_line(serve: Callable[..., RawBackend],
                                     capsys: pytest.CaptureFixture[str], script: Script,
                                     named: str) -> None:
    api = serve(script)
    line = fails(capsys, f"http://{api.address}", "list")
    assert line.startswith(f"balancerctl: http://{api.address}: ") and named in line, line


# 5. TLS ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


def tls_server(serve: Callable[..., RawBackend], ca: TestCA, tmp_path: Path,
               *names: str, ips: tuple[str, ...] = ()) -> RawBackend:
    chain, key = ca.issue(*names, ips=ips)
    (tmp_path / "chain.pem").write_text(chain)
    (tmp_path / "key.pem").write_text(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")
    return serve(sending(answer()), tls=context)


def test_https_verifies_the_certificate(serve: Callable[..., RawBackend], ca: TestCA,
                                        tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    api = tls_server(serve, ca, tmp_path, "localhost", ips=("127.0.0.1",))
    line = fails(capsys, f"https://127.0.0.1:{api.port}", "list")
    assert line.startswith(f"balancerctl: https://127.0.0.1:{api.port}: its TLS certificate "
                           "is not trusted: self-signed certificate in certificate chain"), line
    assert "SSL_CERT_FILE" in line and api.requests == []  # nothing sent: no token either
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.write(tmp_path)))
    for host in ("127.0.0.1", "localhost"):
        assert main(["--url", f"https://{host}:{api.port}", "list"]) == 0
        assert "no hosts (version 1)" in capsys.readouterr().out


def test_https_checks_the_host_name(serve: Callable[..., RawBackend], ca: TestCA,
                                    tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    api = tls_server(serve, ca, tmp_path, "other.test")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.write(tmp_path)))
    line = fails(capsys, f"https://localhost:{api.port}", "list")
    assert "not trusted: Hostname mismatch, certificate is not valid for 'localhost'" in line
    assert api.requests == []


def test_https_to_a_plain_http_server(capsys: pytest.CaptureFixture[str]) -> None:
    def greet(conn: socket.socket) -> None:  # answers at once, whatever comes
        with conn:
            conn.sendall(answer(status="400 Bad Request"))

    with socket.create_server(("127.0.0.1", 0)) as plain:
        serve_each(plain, greet)
        line = fails(capsys, f"https://127.0.0.1:{plain.getsockname()[1]}", "list")
    assert "TLS handshake failed" in line and "(does it serve https?)" in line, line
