"""`loadtest.measure.mappings_kb`: a process's memory by kind of mapping, read
from a real process's /proc/PID/smaps (what `scripts/bench_tree_memory.py
--mappings` prints for each of the balancer's processes)."""

from __future__ import annotations

import subprocess
import sys

from loadtest.measure import MAPPING_KINDS, mapping_kind, mappings_kb, rollup_kb

MIB = 1024
# a process that holds 16 MiB it wrote (an anonymous mapping: malloc maps a block
# that big apart from its heap) and says when it has
HOLDER = ("import sys, time\nheld = bytearray(16 << 20)\nheld[::4096] = b'x' * (16 << 8)\n"
          "print('ready', flush=True)\ntime.sleep(60)")


def test_each_kind_of_mapping_is_named_by_its_path_and_permissions() -> None:
    assert mapping_kind("", "rw-p") == "anonymous"
    assert mapping_kind("[anon:glibc malloc]", "rw-p") == "anonymous"
    assert mapping_kind("[heap]", "rw-p") == "heap"
    assert mapping_kind("[stack]", "rw-p") == "stack"
    assert mapping_kind("/usr/lib/libpython3.11.so.1.0", "rw-p") == "file data"
    assert mapping_kind("/usr/lib/libpython3.11.so.1.0", "r-xp") == "file code"
    assert mapping_kind("/tmp/x (deleted)", "r--p") == "file code"


def test_a_process_memory_is_split_by_kind_and_adds_up_to_its_pss() -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        found = mappings_kb(proc.pid)
        total = rollup_kb(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert tuple(found) == MAPPING_KINDS
    pss, dirty = found["anonymous"]
    assert pss >= 16 * MIB and dirty >= 16 * MIB  # what it wrote, held alone
    assert found["file code"][0] > 0 and found["file data"][1] > 0  # the interpreter's
    summed = sum(pss for pss, _ in found.values())
    assert abs(summed - total["Pss"]) <= total["Pss"] // 20, (found, total)  # read apart


def test_a_gone_process_reads_as_zeros() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: /proc/PID is gone
    assert mappings_kb(proc.pid) == dict.fromkeys(MAPPING_KINDS, (0, 0))
