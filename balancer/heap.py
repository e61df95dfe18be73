"""Giving freed memory back to the system: after a burst (the worker's
`quiet_loop`), in the arbiter before each fork (`balancer.preload.freeze`) and
in the management process once set up (`management.process.run_management`
through `freeze`); the arbiter's pages of files' code it ran only to start
(`release_file_pages`); and, with `server.merge_pages`, letting the kernel store
the pages the processes hold alike once (`merge_pages`).

glibc's malloc keeps the pages of freed blocks inside its heap: a burst's
saved greenlet stacks and buffers, once freed, stay in the worker's resident
set. `release` asks it (``malloc_trim(0)``) to return every wholly free page;
a C library without it (musl) makes `release` do nothing.

Every child copies the arbiter's pages it writes to (CPython 3.11 writes a
reference count into every object it touches), and many of those copies are
soon the same bytes again (a reference taken and dropped): 1.7-1.8 MiB of
each child's 7-10 MiB of copies, idle (docs/performance.md). Linux's
same-page merging (KSM, its `ksmd` thread) stores such pages once again,
copy-on-write, in the processes that asked for it (`PR_SET_MEMORY_MERGE`,
Linux 6.4: every mapping of the process, and of the children it forks).
It is off unless asked: a process on the same host that also asked could
tell, by timing its own writes, whether ours hold a page with the same bytes
as one of its own; and it does nothing unless the host runs ksmd
(/sys/kernel/mm/ksm/run is 1).

Importing ran code the arbiter never runs again: its children's modules'
initialisation (the compiled modules' building of their constants), the
interpreter's unmarshalling and compiling, OpenSSL's and C++'s start. Those
pages of read-only file mappings stay in its resident set (16 MiB of them
after a start; 1.0 MiB of the tree's Pss, docs/performance.md) though it only
waits for signals and its children's reports. `release_file_pages` unmaps
them (`madvise(MADV_DONTNEED)`): the kernel maps a page again, from the page
cache, at its next use, so nothing is lost but that page's minor fault. A
read-only mapping holding pages of its own (a library's relocated data,
`Anonymous` or, swapped out, `Swap` above 0 in smaps) is left alone: those
would be lost.

Invariants:
* `release_file_pages` is called by the arbiter only (every child runs its
  code again soon: it would fault its pages back at once), once every child
  is ready.
* `release` is called only when many blocks were just freed or before pages
  are shared, never per request: it walks the heap (about a millisecond for
  a worker's).
* `merge_pages` is called by the arbiter before a fork (the child inherits
  the mark); no child calls it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, Iterator
from typing import Any

MADV_DONTNEED = 4  # madvise(2): a private mapping's pages dropped, read again at their next use
PR_SET_MEMORY_MERGE = 67  # prctl(2), Linux 6.4
KSM_RUN = "/sys/kernel/mm/ksm/run"  # "1": the host's ksmd merges marked pages


def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()
_TRIM = getattr(_LIBC, "malloc_trim", None)
_PRCTL = getattr(_LIBC, "prctl", None)
_MADVISE = getattr(_LIBC, "madvise", None)
if _MADVISE is not None:
    _MADVISE.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def release() -> bool:
    """Return the heap's wholly free pages to the system; whether it could."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


def release_file_pages() -> int:
    """Unmap this process's resident pages of read-only file mappings that hold
    no page of their own; the KiB unmapped (0 without /proc or `madvise`; a
    line it cannot read ends the walk there)."""
    if _MADVISE is None:
        return 0
    released = 0
    try:
        with open("/proc/self/smaps") as f:  # line by line: no list of lines in the heap
            for start, length, rss in unmappable(f):
                if _MADVISE(start, length, MADV_DONTNEED) == 0:
                    released += rss
    except (OSError, ValueError, IndexError):
        return released
    return released


def unmappable(smaps: Iterable[str]) -> Iterator[tuple[int, int, int]]:
    """The read-only file mappings of `smaps`'s lines holding resident pages
    and none of their own, as (start, length, resident KiB). A page of its own
    is one written before the mapping was made read-only (a relocation):
    resident it counts in `Anonymous`, swapped out in `Swap` only, and either
    would be lost (read again from the file)."""
    start = end = rss = own = 0
    unmap = False
    for line in smaps:
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith(("Anonymous:", "Swap:")):
            own += int(line.split()[1])
        elif line.startswith("VmFlags:"):  # a mapping's last line
            if unmap and rss and not own:
                yield start, end - start, rss
            unmap = False
        elif not line[0].isupper():  # a mapping's first line: its range
            fields = line.split()
            low, high = fields[0].split("-")
            start, end, own = int(low, 16), int(high, 16), 0
            unmap = "w" not in fields[1] and len(fields) > 5 and fields[5][0] == "/"


def merge_pages(on: bool) -> str:
    """Mark (`on`) or unmark this process's memory for same-page merging, for
    its children to come too; "" once done, else why not (an older kernel,
    one without KSM, or no `prctl`)."""
    if _PRCTL is None:
        return "prctl is not available"
    if _PRCTL(PR_SET_MEMORY_MERGE, int(on), 0, 0, 0) == 0:
        return ""
    err = ctypes.get_errno()
    return f"the kernel refused PR_SET_MEMORY_MERGE ({os.strerror(err)}: Linux 6.4 with KSM needed)"


def ksm_running() -> bool:
    """Whether the host's ksmd merges marked pages (`KSM_RUN` reads 1)."""
    try:
        with open(KSM_RUN) as f:
            return f.read().strip() == "1"
    except OSError:
        return False
