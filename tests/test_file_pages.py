"""The arbiter unmaps the pages of files' code it ran only to start
(`balancer.heap.release_file_pages`): once its children are ready its
resident set holds little of the interpreter's, the libraries' and the
compiled modules' code, and whatever it runs later is read again from the
page cache. A read-only mapping holding pages of its own (a library's
relocated data) keeps them: a process that released its pages still runs
OpenSSL, hashing and the compiler."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support import ROOT, Backend, request, wait_for

HOST = "app.test"


def read_only_file_kib(pid: int) -> int:
    """The resident KiB of process `pid`'s read-only file mappings."""
    total, read_only = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line.startswith("Rss:") and read_only:
                total += int(line.split()[1])
            elif not line[0].isupper():
                fields = line.split()
                read_only = "w" not in fields[1] and len(fields) > 5 and fields[5][0] == "/"
    return total


def test_the_arbiter_holds_less_files_code_than_its_children(
        backend: Backend, proxy_to: Callable[..., Any]) -> None:
    bal = proxy_to(backend, HOST)
    assert request(bal.port, host=HOST)[0] == 200
    arbiter = bal.proc.pid
    listed = Path(f"/proc/{arbiter}/task/{arbiter}/children").read_text()
    kids = [int(p) for p in listed.split()]
    assert len(kids) == 2
    # it imported everything they run; unreleased, it holds more than either
    wait_for(lambda: read_only_file_kib(arbiter) < min(map(read_only_file_kib, kids)),
             what="the arbiter's files' pages released")
    assert bal.api("GET", "/api/v1/stats")[0] == 200
    assert "Traceback" not in bal.output()


RUN_AFTER = """
import hashlib, json, ssl, sys
from balancer.heap import release_file_pages
released = release_file_pages()
context = ssl.create_default_context()  # libcrypto's and libssl's relocated data kept
out = {"released": released, "sha": hashlib.sha256(b"abc").hexdigest(),
       "code": eval(compile("sum(range(10))", "<x>", "eval")), "tls": context.protocol.name}
print(json.dumps(out))
"""


def test_a_process_runs_on_after_releasing_its_files_pages() -> None:
    done = subprocess.run([sys.executable, "-c", RUN_AFTER], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, env={"PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["released"] > 1024  # KiB: the interpreter's own code at least
    assert out["sha"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert out["code"] == 45 and out["tls"] == "PROTOCOL_TLS_CLIENT"
