"""A real ACME server for the tests: Debian's `pebble` (Let's Encrypt's test CA)
with `pebble-challtestsrv` as its DNS, answering 127.0.0.1 for every name.

Pebble validates for real (``PEBBLE_VA_ALWAYS_VALID`` is never set): HTTP-01 on
`http_port` and TLS-ALPN-01 on `tls_port` of 127.0.0.1, where the tests run a
balancer. Its API is HTTPS with a certificate from the tests' own CA
(`ca_bundle`, what the balancer's ``[acme] ca_bundle`` names).

Every port is held (`HeldPort`) from `Pebble()` to `stop`: pebble, challtestsrv
(Go listeners) and the balancers the tests start one after another on
`http_port` and `tls_port` listen beside the holder with SO_REUSEADDR. The DNS
port's UDP side cannot be held (challtestsrv binds UDP without SO_REUSEADDR):
when another process has it, challtestsrv logs the failure and runs on without
UDP DNS, so challtestsrv is started again on a fresh port (`DNS_ATTEMPTS`).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import struct
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from loadtest.procs import HeldPort
from tests.conftest import required_tool, wait_until
from tests.tlsca import TestCA

DNS_ATTEMPTS = 3
DNS_WAIT = 3.0  # seconds for a started challtestsrv to answer on UDP
# a DNS query (id 0x5eed, recursion desired) for the A record of probe.test
DNS_PROBE = (struct.pack("!6H", 0x5EED, 0x0100, 1, 0, 0, 0) + b"\x05probe\x04test\x00"
             + struct.pack("!2H", 1, 1))


class Pebble:
    """pebble + pebble-challtestsrv on held loopback ports (`start`, `stop`)."""

    def __init__(self, directory: Path) -> None:
        self.pebble = required_tool("pebble", "pebble")
        self.challtestsrv = required_tool("pebble-challtestsrv", "pebble")
        self.directory = directory
        self.held: list[HeldPort] = []
        self.port, self.management = self._hold(), self._hold()
        self.http_port, self.tls_port = self._hold(), self._hold()
        self.dns_port, self.dns_management = self._hold(), self._hold()
        self.procs: list[subprocess.Popen] = []
        ca = TestCA("pebble API test CA")
        chain, key = ca.issue("localhost", ips=("127.0.0.1",))
        self.ca_bundle = directory / "pebble-api-ca.pem"
        self.ca_bundle.write_text(ca.pem)
        (directory / "pebble-api.pem").write_text(chain)
        (directory / "pebble-api.key").write_text(key)

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self) -> Pebble:
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management}",
            "certificate": str(self.directory / "pebble-api.pem"),
            "privateKey": str(self.directory / "pebble-api.key"),
            "httpPort": self.http_port, "tlsPort": self.tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": False}}
        path = self.directory / "pebble.json"
        path.write_text(json.dumps(config))
        self._start_challtestsrv()
        env = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0",
               "PEBBLE_AUTHZREUSE": "0"}  # every order is validated anew
        self._spawn("pebble", [self.pebble, "-config", str(path), "-dnsserver",
                               f"127.0.0.1:{self.dns_port}"], env)
        wait_until(lambda: self._up(self.directory_url), timeout=10, message="pebble")
        return self

    def _hold(self) -> int:
        self.held.append(HeldPort())
        return self.held[-1].port

    def _start_challtestsrv(self) -> None:
        """challtestsrv answering DNS on UDP: on a fresh `dns_port` again when the
        UDP port was taken (bounded: `DNS_ATTEMPTS`)."""
        for _ in range(DNS_ATTEMPTS):
            proc = self._spawn("challtestsrv", [
                self.challtestsrv, "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
                "-dns01", f"127.0.0.1:{self.dns_port}", "-http01", "", "-https01", "",
                "-tlsalpn01", "", "-management", f"127.0.0.1:{self.dns_management}"], {})
            wait_until(lambda: self._up(f"http://127.0.0.1:{self.dns_management}/"),
                       timeout=10, message="pebble-challtestsrv")
            if self.answers_dns():
                return
            log = (self.directory / "challtestsrv.log").read_text()[-1000:]
            self._end(proc)
            self.dns_port = self._hold()
        raise AssertionError(f"pebble-challtestsrv never answered DNS on UDP, "
                             f"tried on {DNS_ATTEMPTS} ports; last log: {log}")

    def answers_dns(self, timeout: float = DNS_WAIT) -> bool:
        """Whether challtestsrv answers a DNS query on UDP `dns_port` within `timeout`."""
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.2)
            while time.monotonic() < deadline:
                sock.sendto(DNS_PROBE, ("127.0.0.1", self.dns_port))
                try:
                    if sock.recv(512)[:2] == DNS_PROBE[:2]:
                        return True
                except OSError:
                    pass  # not bound yet (or by someone else): ask again
        return False

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        full = {k: v for k, v in os.environ.items() if not k.startswith("PEBBLE_")}
        log = open(self.directory / f"{name}.log", "w")  # noqa: SIM115 - the child keeps it
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                           env={**full, **env}, cwd=self.directory))
        log.close()
        return self.procs[-1]

    def _up(self, url: str) -> bool:
        for proc in self.procs:
            if proc.poll() is not None:
                logs = "".join(p.read_text()[-2000:] for p in self.directory.glob("*.log"))
                raise AssertionError(f"{proc.args[0]} exited {proc.returncode}: {logs}")
        try:
            self.get(url)
        except urllib.error.HTTPError:
            return True  # it answers
        except OSError:
            return False
        return True

    def get(self, url: str) -> bytes:
        context = ssl.create_default_context(cafile=str(self.ca_bundle))
        with urllib.request.urlopen(url, timeout=5, context=context) as answer:
            return answer.read()

    def roots(self) -> str:
        """Pebble's root certificate (made anew by each pebble run), PEM."""
        return self.get(f"https://127.0.0.1:{self.management}/roots/0").decode()

    def point(self, host: str, address: str) -> None:
        """Make the DNS answer `address` for `host` (challtestsrv's add-a)."""
        body = json.dumps({"host": host, "addresses": [address]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.dns_management}/add-a",
                                         data=body, method="POST")
        with urllib.request.urlopen(request, timeout=5) as answer:
            answer.read()

    def config(self, challenge: str = "http-01", renew_before: int = 30,
               extra: str = "") -> str:
        """The balancer's ``[acme]`` section for this pebble."""
        return (f'[acme]\ndirectory = "{self.directory_url}"\n'
                f'ca_bundle = "{self.ca_bundle}"\nemail = "ops@example.com"\n'
                f'challenge = "{challenge}"\nrenew_before = {renew_before}\n{extra}')

    def stop(self) -> None:
        """Stop both servers and give every port back."""
        for proc in list(self.procs):
            self._end(proc)
        for held in self.held:
            held.release()

    def _end(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.remove(proc)


def served_certificate(port: int, name: str, cafile: str | None = None) -> dict[str, Any]:
    """The certificate a TLS listener serves for `name` (verified against `cafile`)."""
    if cafile:
        context = ssl.create_default_context(cafile=cafile)
    else:
        context = ssl._create_unverified_context()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    return {"issuer": cert.issuer.rfc4514_string(), "serial": cert.serial_number,
            "not_after": cert.not_valid_after_utc.timestamp()}
