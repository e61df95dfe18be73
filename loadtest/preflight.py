"""`loadtest preflight`: the live kernel settings and descriptor limits against
what sysctl/loadtest.conf and sysctl/limits.conf ask for, with the exact
command that fixes each difference.

An IMPORTANT check that fails makes the exit code 1 (the full run would
measure the machine's limits, not the servers); a WARN is worth fixing but
the run is still meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loadtest.limits import raise_nofile
from loadtest.targets import tool_path

PROC_SYS = Path("/proc/sys")
NOFILE_NEEDED = 20000  # 10,000 idle clients plus backends and live traffic
NOFILE_WANTED = 65536


@dataclass(frozen=True)
class Check:
    """One kernel setting: the floor it needs and why."""

    key: str
    floor: int
    wanted: int  # the value sysctl/loadtest.conf sets
    important: bool
    why: str

    def read(self, root: Path = PROC_SYS) -> str | None:
        try:
            return (root / self.key.replace(".", "/")).read_text().strip()
        except OSError:
            return None


CHECKS = (
    Check("net.core.somaxconn", 4096, 8192, True, "listen backlog cap; targets ask for 4096"),
    Check("fs.file-max", 200000, 2097152, True, "open files, all processes together"),
    Check("fs.nr_open", NOFILE_NEEDED, 1048576, True, "ceiling for any RLIMIT_NOFILE"),
    Check("net.ipv4.tcp_max_syn_backlog", 8192, 8192, False,
          "half-open connections per listener"),
    Check("net.core.netdev_max_backlog", 16384, 16384, False, "per-CPU input packet queue"),
    Check("net.ipv4.tcp_tw_reuse", 1, 1, False, "reuse TIME_WAIT ports (1 or 2)"),
    Check("net.ipv4.tcp_fin_timeout", 0, 15, False, "informational"),
    Check("net.netfilter.nf_conntrack_max", 262144, 262144, False,
          "tracked connections (if loaded)"),
    Check("kernel.pid_max", 32768, 4194304, False,
          "one task per thread of the threaded baselines"),
    Check("vm.max_map_count", 65530, 262144, False, "two maps per thread stack"),
)
PORT_RANGE_NEEDED = 28000


def _line(status: str, text: str, fix: str = "") -> str:
    return f"{status:<9} {text}" + (f"\n          fix: {fix}" if fix else "")


def check_sysctl(check: Check, root: Path = PROC_SYS) -> tuple[str, str]:
    """(status, printed line) of one setting; status is OK, WARN, FAIL or ABSENT."""
    value = check.read(root)
    if value is None:
        return "ABSENT", _line("absent", f"{check.key}: not present here ({check.why})")
    number = int(value.split()[0])
    ok = number in (1, 2) if check.key == "net.ipv4.tcp_tw_reuse" else number >= check.floor
    if ok:
        return "OK", _line("ok", f"{check.key} = {value}")
    status = "FAIL" if check.important else "WARN"
    return status, _line("IMPORTANT" if check.important else "warn",
                         f"{check.key} = {value}, want >= {check.floor} ({check.why})",
                         f"sysctl -w {check.key}={check.wanted}  "
                         "(persist: sysctl/loadtest.conf -> /etc/sysctl.d/)")


def check_port_range(root: Path = PROC_SYS) -> tuple[str, str]:
    key = "net.ipv4.ip_local_port_range"
    text = Check(key, 0, 0, False, "").read(root)
    if text is None:
        return "ABSENT", _line("absent", f"{key}: not present here")
    low, high = (int(x) for x in text.split())
    if high - low >= PORT_RANGE_NEEDED:
        return "OK", _line("ok", f"{key} = {low} {high} ({high - low} ports)")
    return "WARN", _line("warn", f"{key} = {low} {high}: only {high - low} ports",
                         f'sysctl -w {key}="10240 65535"')


def check_nofile() -> tuple[str, str]:
    """Raise the soft limit to the hard one, then judge the result."""
    soft, hard = raise_nofile()
    text = f"RLIMIT_NOFILE soft {soft} (raised to the hard limit), hard {hard}"
    fix = ("raise the hard limit: sysctl/limits.conf -> /etc/security/limits.d/ "
           f"(nofile {NOFILE_WANTED}), or `ulimit -Hn {NOFILE_WANTED}` as root before the run")
    if soft < NOFILE_NEEDED:
        return "FAIL", _line("IMPORTANT", f"{text}: the idle scenario needs {NOFILE_NEEDED}",
                             fix)
    if soft < NOFILE_WANTED:
        return "WARN", _line("warn", f"{text}: enough for 10,000 connections, "
                                     f"{NOFILE_WANTED} leaves room", fix)
    return "OK", _line("ok", text)


def check_tools() -> list[str]:
    lines = []
    for tool, use in (("wrk", "load generator (else the built-in one)"),
                      ("haproxy", "the haproxy target"), ("nginx", "the nginx target and "
                                                                   "the backend")):
        found = tool_path(tool)
        lines.append(_line("ok" if found else "missing", f"{tool}: {found or use + ' skipped'}"))
    try:
        import matplotlib  # noqa: F401
        lines.append(_line("ok", "matplotlib: plots enabled"))
    except ImportError:
        lines.append(_line("missing", "matplotlib: plots skipped (pip install matplotlib, "
                                      "or the package with its loadtest extra)"))
    return lines


def preflight(print_fn=print) -> int:
    """Print every check; 1 if an important one failed, else 0."""
    results = [check_nofile(), check_port_range()] + [check_sysctl(c) for c in CHECKS]
    for _, line in results:
        print_fn(line)
    for line in check_tools():
        print_fn(line)
    failed = [line for status, line in results if status == "FAIL"]
    print_fn(f"\n{len(failed)} important problem(s), "
             f"{sum(1 for s, _ in results if s == 'WARN')} warning(s).")
    return 1 if failed else 0
