"""How long a balancer with many stored certificates takes to serve HTTPS.

``python scripts/bench_cert_startup.py [--certs 5000] [--store file|redis] [--workers 2]``

Makes `--certs` ECDSA P-256 certificates (``hN.bench.test``, one test CA; kept
in ``--cache`` so that the next run with as many starts at once), stores them
(file store, or a redis-server started here on a free loopback port) beside a
catch-all static rule, then starts ``balancer serve`` and measures, from the
start of the process:

* ``first``: until HTTPS for ``h0.bench.test`` answers (a verified handshake
  and a 200);
* ``last``: until ``h(N-1).bench.test`` answers too;
* ``all``: until every host (``--sweep N``: N of them, evenly spread)
  answered once (one client connection per host, in order, right after
  ``last``: its own handshakes are part of this figure, and a second pass
  over the same hosts, shown too, says what they cost once all are served);

then the resident memory of each worker (when ``last`` answered, and at the
end), the CPU of the balancer's processes
(arbiter, management, workers) by then; with ``--handshakes SECONDS``, full
handshakes a second for ``h0.bench.test``, the default host (``openssl s_time
-new``). Run it
under ``flock /tmp/bench.lock`` with ``PYTHONPATH`` naming the tree to measure
(its compiled copy for compiled figures).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

STARTUP_LIMIT = 300.0  # seconds the balancer may take to answer at all
DOMAIN = "bench.test"


def make_certs(count: int) -> dict[str, Any]:
    """``{"ca": PEM, "records": HOST → store record}`` of `count` leaves of one CA."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    now = datetime.datetime.now(datetime.UTC)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
          .sign(ca_key, hashes.SHA256()))
    ca_pem = ca.public_bytes(serialization.Encoding.PEM).decode()
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    records = {}
    for number in range(count):
        host = f"h{number}.{DOMAIN}"
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=365))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), False)
                .add_extension(aki, False).sign(ca_key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        records[host] = {"chain": leaf.public_bytes(serialization.Encoding.PEM).decode() + ca_pem,
                         "key": key_pem, "source": "upload",
                         "not_after": leaf.not_valid_after_utc.timestamp()}
    return {"ca": ca_pem, "records": records}


def cached_certs(count: int, directory: Path) -> dict[str, Any]:
    """The certificates kept in `directory` (made, with it, if missing). Bug: a
    missing `--cache` directory ended the run with a traceback, after the
    certificates were made; so did one where no file can be written (told
    before they are made now)."""
    path = directory / f"bench-certs-{count}.json"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if path.exists():
            return dict(json.loads(path.read_text()))
        with path.with_suffix(".part").open("w") as kept:  # (whole, or not there)
            made = make_certs(count)
            kept.write(json.dumps(made))
        path.with_suffix(".part").replace(path)
    except OSError as exc:
        raise SystemExit(f"--cache {directory}: {exc.strerror or exc}") from None
    return made


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


def wait_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"port {port} never listened")


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--dir", directory],
                              stdout=subprocess.DEVNULL)
    wait_port(port, time.monotonic() + 10)
    return server, f"redis://127.0.0.1:{port}/0"


def fill_store(url: str, records: dict[str, Any]) -> None:
    from balancer.stores import open_store

    store = open_store(url)
    try:
        store.replace({"*": {"action": "static", "body": "ok"}})
        store.certs().restore(records)
    finally:
        store.close()


def answers(port: int, host: str, context: ssl.SSLContext) -> bool:
    """Whether HTTPS for `host` answers 200 with a certificate valid for it."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            return tls.recv(12) == b"HTTP/1.1 200"
    except (OSError, ssl.SSLError):
        return False


def until_answers(port: int, host: str, context: ssl.SSLContext, began: float) -> float:
    deadline = began + STARTUP_LIMIT
    while time.monotonic() < deadline:
        if answers(port, host, context):
            return time.monotonic() - began
        time.sleep(0.01)
    raise SystemExit(f"{host} did not answer within {STARTUP_LIMIT:.0f} s")


def handshakes(port: int, host: str, seconds: int) -> float:
    """Full handshakes a second for `host` (already served; the balancer's
    ``tls.default_host``: ``openssl s_time -new`` of OpenSSL 3.0 sends no SNI)."""
    out = subprocess.run(["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new",
                          "-time", str(seconds)],
                         capture_output=True, text=True, check=True).stdout
    done = next(line for line in out.splitlines() if "connections in" in line and "real" in line)
    count, _, rest = done.partition(" connections in ")
    return int(count) / float(rest.split()[0])


def worker_pids() -> set[int]:
    """The pids of the workers alive now (each listens on ``worker-PID.sock``)."""
    with open("/proc/net/unix") as table:
        names = [line.split()[-1].rpartition("/")[2] for line in table]
    return {int(name[7:-5]) for name in names
            if name.startswith("worker-") and name.endswith(".sock")}


def workers_rss(root: int) -> list[int]:
    """Resident KiB of each worker of the balancer `root`."""
    children = {int(pid) for pid in subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(root)], capture_output=True, text=True).stdout.split()}
    found = []
    for pid in sorted(children & worker_pids()):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                found.append(int(line.split()[1]))
    return found


def tree_cpu(root: int) -> float:
    """CPU seconds of `root` and its children so far (utime + stime)."""
    total = 0
    pids = [root] + [int(p) for p in subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(root)], capture_output=True, text=True).stdout.split()]
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def run(args: argparse.Namespace, made: dict[str, Any], tmp: str) -> dict[str, Any]:
    redis = None
    if args.store == "redis":
        redis, url = start_redis(tmp)
    else:
        url = f"file:{tmp}/routes.json"
    try:
        fill_store(url, made["records"])
        context = ssl.create_default_context(cadata=made["ca"])
        tls, management = free_port(), free_port()
        began = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "balancer", "serve", "--workers", str(args.workers),
             "--listen", f"127.0.0.1:{free_port()}", "--tls-listen", f"127.0.0.1:{tls}",
             "--management", f"127.0.0.1:{management}", "--store", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp,
            env={**os.environ, "BALANCER_TLS_DEFAULT_HOST": next(iter(made["records"]))})
        try:
            hosts = list(made["records"])
            first = until_answers(tls, hosts[0], context, began)
            last = until_answers(tls, hosts[-1], context, began)
            at_start = workers_rss(proc.pid)
            if args.sweep:  # every len / sweep'th host only
                hosts = hosts[::max(1, len(hosts) // args.sweep)]
            failed = [host for host in hosts if not answers(tls, host, context)]
            every = time.monotonic() - began
            again = time.monotonic()
            failed += [host for host in hosts if not answers(tls, host, context)]
            sweep = time.monotonic() - again
            rate = handshakes(tls, hosts[0], args.handshakes) if args.handshakes else 0.0
            return {"first": first, "last": last, "all": every, "failed": len(failed),
                    "sweep": sweep, "rate": rate, "rss_start": at_start,
                    "rss_kib": workers_rss(proc.pid), "cpu": tree_cpu(proc.pid)}
        finally:
            proc.terminate()
            proc.wait(60)
    finally:
        if redis is not None:
            redis.terminate()
            redis.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--certs", type=int, default=5000)
    parser.add_argument("--store", choices=("file", "redis"), default="file")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sweep", type=int, default=0, metavar="N",
                        help="the passes over the hosts take N of them, evenly spread "
                             "(default: all)")
    parser.add_argument("--handshakes", type=int, default=0, metavar="SECONDS",
                        help="then measure full handshakes a second for the first host "
                             "(openssl s_time -new) for that long")
    parser.add_argument("--cache", default=tempfile.gettempdir(),
                        help="directory keeping the generated certificates between runs (made "
                             "if missing)")
    args = parser.parse_args()
    made = cached_certs(args.certs, Path(args.cache))
    with tempfile.TemporaryDirectory(prefix="bench-cert-startup-") as tmp:
        found = run(args, made, tmp)
    print(f"{args.certs} certificates, {args.store} store, {args.workers} workers: "
          f"first host {found['first']:.2f} s, last host {found['last']:.2f} s, "
          f"all {found['all']:.2f} s ({found['failed']} failed; a second pass over them "
          f"{found['sweep']:.2f} s); worker RSS "
          f"{', '.join(f'{kib // 1024} MiB' for kib in found['rss_start'])} when the last "
          f"answered, {', '.join(f'{kib // 1024} MiB' for kib in found['rss_kib'])} at the end; "
          f"CPU {found['cpu']:.1f} s"
          + (f"; {found['rate']:.0f} handshakes/s" if args.handshakes else ""))


if __name__ == "__main__":
    main()
