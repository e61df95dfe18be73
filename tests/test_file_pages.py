"""The arbiter unmaps the pages of files' code it ran only to start
(`balancer.heap.release_file_pages`; that a running balancer's arbiter then
holds less of it than its children: tests/test_memory.py): whatever a process
runs later is read again from the page cache. A read-only mapping holding
pages of its own (a library's relocated data) keeps them: a process that
released its pages still runs OpenSSL, hashing and the compiler; one whose
written page was swapped out (smaps: `Anonymous` 0, `Swap` above 0) keeps it
too."""

from __future__ import annotations

import json
import subprocess
import sys

from balancer.heap import unmappable
from tests.support import ROOT

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


def smaps_entry(head: str, rss: int = 968, anonymous: int = 0, swap: int = 0) -> list[str]:
    """One mapping's lines as /proc/PID/smaps (Linux 6.x) writes them."""
    counts = [("Size", 1368), ("Rss", rss), ("Pss", 16), ("Private_Dirty", anonymous),
              ("Anonymous", anonymous), ("KSM", 0), ("AnonHugePages", 0), ("Swap", swap),
              ("SwapPss", swap), ("Locked", 0)]
    return ([head + "\n"] + [f"{name}:{value:>15} kB\n" for name, value in counts]
            + ["THPeligible:    0\n", "VmFlags: rd ex mr mw me \n"])


def test_only_clean_read_only_file_mappings_are_unmapped() -> None:
    lib = "/usr/lib/x86_64-linux-gnu/libc.so.6"
    smaps = (smaps_entry(f"1000-3000 r-xp 00026000 fe:00 339380  {lib}")
             + smaps_entry(f"3000-4000 r--p 00170000 fe:00 339380  {lib}", anonymous=4)
             # a relocated page swapped out: no longer Anonymous, its bytes in swap only
             + smaps_entry(f"4000-5000 r--p 00171000 fe:00 339380  {lib}", rss=0, swap=4)
             + smaps_entry(f"5000-7000 r--p 00172000 fe:00 339380  {lib}", rss=4, swap=4)
             + smaps_entry(f"7000-8000 rw-p 00173000 fe:00 339380  {lib}", rss=4)
             + smaps_entry("8000-9000 r--p 00000000 00:00 0  [vvar]", rss=4)
             + smaps_entry("9000-a000 r-xp 00000000 00:00 0  [vdso]", rss=4)
             + smaps_entry(f"a000-b000 r--p 00000000 fe:00 339380  {lib}", rss=0)
             + smaps_entry("b000-d000 r--s 00000000 00:01 7  /memfd:x (deleted)", rss=8))
    assert list(unmappable(smaps)) == [(0x1000, 0x2000, 968), (0xb000, 0x2000, 8)]
