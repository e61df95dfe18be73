"""CPU and memory of a target, read from /proc (the process and its descendants)."""

from __future__ import annotations

import contextlib
import os
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


@dataclass
class UsageWindow:
    """CPU % (of one core) and peak RSS of a process tree over a measured window."""

    root: int
    started: float = 0.0
    cpu_start: float = 0.0
    peak_is_window: bool = False
    machine_start: tuple[int, int] = (0, 0)

    def begin(self) -> None:
        self.machine_start = machine_jiffies()
        pids = process_tree(self.root)
        self.peak_is_window = reset_peak(pids)
        self.cpu_start = cpu_seconds(pids)
        self.started = time.monotonic()

    def end(self) -> dict[str, float | int | bool]:
        """Figures since `begin`: cpu_percent, peak_rss_kb, rss_kb, and how busy the
        whole machine was (to spot a run disturbed by other work)."""
        pids = process_tree(self.root)
        elapsed = max(time.monotonic() - self.started, 1e-6)
        cpu = 0.0
        with contextlib.suppress(ValueError):
            cpu = (cpu_seconds(pids) - self.cpu_start) / elapsed * 100.0
        busy, total = machine_jiffies()
        busy -= self.machine_start[0]
        total -= self.machine_start[1]
        machine = (os.cpu_count() or 1) * busy / total if total > 0 else 0.0
        return {"cpu_percent": round(cpu, 1), "peak_rss_kb": peak_rss_kb(pids),
                "rss_kb": rss_kb(pids), "peak_is_window": self.peak_is_window,
                # all CPUs together (target, generator and anything else running)
                "machine_busy_cores": round(machine, 2),
                "loadavg_1m": round(os.getloadavg()[0], 2)}
