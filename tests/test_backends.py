"""The test suite's echo backend (`tests.support.Backend`) keeps quiet when its
client leaves before the answer, and still prints any other error."""

from __future__ import annotations

import socket
import struct
import sys
from typing import Any

import pytest

from tests.support import CLIENT_LEFT, Backend, BackendServer, EchoHandler, wait_for


class RecordingServer(BackendServer):
    """Notes each error after the backend's own handling of it."""

    errors: list[BaseException | None]

    def handle_error(self, request: Any, client_address: Any) -> None:
        super().handle_error(request, client_address)
        self.errors.append(sys.exc_info()[1])


class BuggyHandler(EchoHandler):
    def act_bug(self, query: dict[str, str], head: bool) -> None:
        raise RuntimeError("a scripted bug in the backend")


def backend_with_errors() -> tuple[Backend, list[BaseException | None]]:
    errors: list[BaseException | None] = []
    server = type("Recording", (RecordingServer,), {"errors": errors})
    return Backend("quiet", handler=BuggyHandler, server=server), errors


def send_and_leave(port: int, path: str, reset: bool) -> None:
    """Send a request and close at once: with `reset`, an RST (SO_LINGER 0)."""
    sock = socket.create_connection(("127.0.0.1", port))
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.close()


# an answer after a delay to a client that reset (ECONNRESET), and a big one to
# a client that closed (its kernel resets the connection the first data hits: EPIPE)
@pytest.mark.parametrize(("path", "reset"), [("/slow?s=0.1", True),
                                             ("/big?n=8000000", False)])
def test_a_client_that_left_is_not_reported(capsys: pytest.CaptureFixture[str], path: str,
                                            reset: bool) -> None:
    backend, errors = backend_with_errors()
    try:
        send_and_leave(backend.port, path, reset)
        wait_for(lambda: errors, timeout=5, what="the backend's write to fail")
    finally:
        backend.stop()
    assert isinstance(errors[0], CLIENT_LEFT), errors
    assert capsys.readouterr().err == ""


def test_any_other_error_is_still_printed(capsys: pytest.CaptureFixture[str]) -> None:
    backend, errors = backend_with_errors()
    try:
        send_and_leave(backend.port, "/bug", reset=False)
        wait_for(lambda: errors, timeout=5, what="the handler's error")
    finally:
        backend.stop()
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a scripted bug in the backend" in err, err
