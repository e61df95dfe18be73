"""CPU and memory of a target, read from /proc (the process and its descendants).

Memory is reported two ways: the sum of each process's peak resident set
(VmHWM), which counts a page shared by forked processes once in each of
them, and the tree's proportional set size (Pss: a shared page split between
the processes mapping it), which is what the tree costs the machine and the
fair figure for comparing a forked tree with a single process. The kernel
keeps no peak Pss, so `UsageWindow` samples it while the load runs.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from loadtest.reaper import stat_fields

CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = stat_fields(int(entry))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU seconds used so far by `pids`."""
    return sum(cpu_split(pids))


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds used so far by `pids`."""
    user = system = 0
    for pid in pids:
        fields = stat_fields(pid)
        if fields:
            user += int(fields[11])  # utime
            system += int(fields[12])  # stime
    return user / CLK_TCK, system / CLK_TCK


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_kb(pids: list[int]) -> int:
    """Current resident set size (VmRSS) summed over `pids`, in KiB."""
    return sum(_status_kb(pid, "VmRSS") for pid in pids)


def peak_rss_kb(pids: list[int]) -> int:
    """Peak resident set size (VmHWM) summed over `pids`, in KiB."""
    return sum(_status_kb(pid, "VmHWM") for pid in pids)


ROLLUP_FIELDS = ("Rss", "Pss", "Pss_Anon", "Private_Clean", "Private_Dirty",
                 "Shared_Clean", "Shared_Dirty")


def rollup_kb(pid: int) -> dict[str, int]:
    """`ROLLUP_FIELDS` of ``/proc/PID/smaps_rollup`` (KiB) now, plus Private and
    Shared (clean and dirty together); zeros when the process is gone."""
    fields = dict.fromkeys(ROLLUP_FIELDS, 0)
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            name, value = line.split(":")
            if name in fields:
                fields[name] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    fields["Private"] = fields["Private_Clean"] + fields["Private_Dirty"]
    fields["Shared"] = fields["Shared_Clean"] + fields["Shared_Dirty"]
    return fields


# the kinds of mapping `mappings_kb` sums, in the order reports print them
MAPPING_KINDS = ("anonymous", "heap", "file data", "stack", "file code")


def mapping_kind(name: str, perms: str) -> str:
    """Which of `MAPPING_KINDS` a mapping of ``/proc/PID/smaps`` is, by its path
    and permissions: anonymous (pymalloc's arenas, blocks malloc maps apart,
    threads' stacks), malloc's heap, a file's writable data (the interpreter's
    and each library's: copied by whichever process writes it), the main
    thread's stack, a file's code and read-only data (shared with every
    process that maps the file)."""
    if name == "[heap]":
        return "heap"
    if name.startswith("[stack"):
        return "stack"
    if not name.startswith("/"):
        return "anonymous"  # no name, or [vvar], [vdso] and the like (no Pss to speak of)
    return "file data" if "w" in perms else "file code"


def mappings_kb(pid: int) -> dict[str, tuple[int, int]]:
    """Pss and Private_Dirty (KiB) of `pid` by `MAPPING_KINDS` (every kind,
    zeros when the process is gone): where a process's memory is, and how much
    of it the process holds alone."""
    sums = {kind: [0, 0] for kind in MAPPING_KINDS}
    current = sums["anonymous"]
    try:
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            head, _, rest = line.partition(" ")
            if "-" in head and ":" not in head:  # a mapping's first line
                fields = rest.split(None, 4)
                current = sums[mapping_kind(fields[4] if len(fields) > 4 else "", fields[0])]
            elif head == "Pss:":
                current[0] += int(rest.split()[0])
            elif head == "Private_Dirty:":
                current[1] += int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return {kind: (0, 0) for kind in MAPPING_KINDS}
    return {kind: (pss, dirty) for kind, (pss, dirty) in sums.items()}


def pss_kb(pids: list[int]) -> int:
    """The proportional set size (Pss) of `pids` together now, in KiB."""
    return sum(rollup_kb(pid)["Pss"] for pid in pids)


def reset_peak(pids: list[int]) -> bool:
    """Reset VmHWM to the current RSS (clear_refs 5); False where not allowed."""
    done = True
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            done = False
    return done


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


PSS_EVERY = 0.5  # seconds between two samples of the tree's Pss


@dataclass
class UsageWindow:
    """CPU % (of one core), peak RSS and peak Pss of a process tree over a
    measured window. The Pss is sampled every `PSS_EVERY` seconds by a thread
    (reading smaps_rollup walks the page tables: about a millisecond for the
    balancer's tree), from `begin` to `end`."""

    root: int
    started: float = 0.0
    cpu_start: float = 0.0
    peak_is_window: bool = False
    machine_start: tuple[int, int] = (0, 0)
    peak_pss: int = 0
    stopped: threading.Event | None = None
    sampler: threading.Thread | None = None

    def begin(self) -> None:
        self.machine_start = machine_jiffies()
        pids = process_tree(self.root)
        self.peak_is_window = reset_peak(pids)
        self.cpu_start = cpu_seconds(pids)
        self.started = time.monotonic()
        self.peak_pss = pss_kb(pids)
        self.stopped = threading.Event()
        self.sampler = threading.Thread(target=self._sample, args=(self.stopped,), daemon=True)
        self.sampler.start()

    def _sample(self, stopped: threading.Event) -> None:
        while not stopped.wait(PSS_EVERY):
            self.peak_pss = max(self.peak_pss, pss_kb(process_tree(self.root)))

    def _stop_sampling(self) -> None:
        if self.stopped and self.sampler:
            self.stopped.set()
            self.sampler.join(timeout=5.0)

    def end(self) -> dict[str, float | int | bool]:
        """Figures since `begin`: cpu_percent, peak_rss_kb (VmHWM summed),
        peak_pss_kb (the tree's, sampled), rss_kb, and how busy the whole
        machine was (to spot a run disturbed by other work)."""
        self._stop_sampling()
        pids = process_tree(self.root)
        self.peak_pss = max(self.peak_pss, pss_kb(pids))
        elapsed = max(time.monotonic() - self.started, 1e-6)
        cpu = 0.0
        with contextlib.suppress(ValueError):
            cpu = (cpu_seconds(pids) - self.cpu_start) / elapsed * 100.0
        busy, total = machine_jiffies()
        busy -= self.machine_start[0]
        total -= self.machine_start[1]
        machine = (os.cpu_count() or 1) * busy / total if total > 0 else 0.0
        return {"cpu_percent": round(cpu, 1), "peak_rss_kb": peak_rss_kb(pids),
                "peak_pss_kb": self.peak_pss,
                "rss_kb": rss_kb(pids), "peak_is_window": self.peak_is_window,
                # all CPUs together (target, generator and anything else running)
                "machine_busy_cores": round(machine, 2),
                "loadavg_1m": round(os.getloadavg()[0], 2)}
