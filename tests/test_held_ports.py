"""`loadtest.procs.HeldPort`, what the tests' and the load runs' servers on fixed
ports rely on (Linux): while held, a port is refused to connections, no bind to
port 0 and no connection's source port gets it, and a server using SO_REUSEADDR
can still listen there, again and again."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys

import pytest

from loadtest.procs import HeldPort
from tests.conftest import required_tool
from tests.support import ROOT

# in a network namespace of its own, with an ephemeral range of two ports: one
# held, every bind to port 0 and every connect gets the other one or none
IN_TWO_PORTS = """
import errno, fcntl, socket, struct
from loadtest.procs import HeldPort
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as any:  # lo up (SIOCSIFFLAGS)
    fcntl.ioctl(any, 0x8914, struct.pack("16sH", b"lo", 0x1 | 0x40))
open("/proc/sys/net/ipv4/ip_local_port_range", "w").write("40000 40001")
held = HeldPort()
listener = socket.create_server(("127.0.0.1", 50000))
got = []
for make in (lambda: socket.create_server(("127.0.0.1", 0)), lambda: socket.socket()):
    kept = []
    for _ in range(3):
        try:
            sock = make()
            if sock.getsockname()[1] == 0:
                sock.connect(("127.0.0.1", 50000))
            kept.append(sock)
            got.append(sock.getsockname()[1])
        except OSError as exc:
            got.append(errno.errorcode[exc.errno])
    for sock in kept:
        sock.close()
print(held.port, got)
"""


def test_a_held_port_refuses_connections_and_a_reuseaddr_server_listens_there_twice():
    with HeldPort() as held:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", held.port), timeout=5)
        for _ in range(2):  # a server started, stopped and started again on it
            with socket.create_server(("127.0.0.1", held.port)) as server:  # SO_REUSEADDR
                with socket.create_connection(("127.0.0.1", held.port), timeout=5):
                    accepted = server.accept()[0]
                accepted.close()  # after the client: no TIME_WAIT on the held port
        with socket.socket() as plain, pytest.raises(OSError) as caught:
            plain.bind(("127.0.0.1", held.port))
        assert caught.value.errno == errno.EADDRINUSE
    with socket.socket() as plain:
        plain.bind(("127.0.0.1", held.port))  # released: anyone's again


def test_no_bind_to_port_zero_and_no_connect_gets_a_held_port(tmp_path):
    unshare = required_tool("unshare", "util-linux")
    if subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode:
        if os.environ.get("CI") == "true":
            pytest.fail("CI needs user and network namespaces (unshare -rn)")
        pytest.skip("no user and network namespaces here (unshare -rn)")
    out = subprocess.run([unshare, "-rn", sys.executable, "-c", IN_TWO_PORTS],
                         capture_output=True, text=True, timeout=30, cwd=tmp_path,
                         env={"PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    held, got = out.stdout.split(" ", 1)
    assert held == "40001" or held == "40000"
    other = 40001 if held == "40000" else 40000
    # bind to port 0 (with SO_REUSEADDR): the other port, then none; connect the same
    assert got.strip() == str([other, "EADDRINUSE", "EADDRINUSE",
                               other, "EADDRNOTAVAIL", "EADDRNOTAVAIL"])
