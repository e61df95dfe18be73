"""Which of the arbiter's pages each child copied, which objects are on them, and why.

``python scripts/bench_cow.py [--tree TREE] [--connections 1000|0] [--duration 8]
[--settle 15] [--top 12]`` (as root: /proc/PID/pagemap shows page frames only to
CAP_SYS_ADMIN)

Starts ``balancer serve --workers 1`` (file store, in front of nginx, as
`scripts/bench_proxy.py` does) from TREE (PYTHONPATH; default: this tree)
with `scripts/cow_dump.py`'s hook, which maps the arbiter's objects at each
fork. Idle (``--settle`` seconds after it listens) and once more while
``wrk -t1 -cN`` keep-alive loads it (two seconds before wrk ends; not with
``--connections 0``), it reads,
for every page of the arbiter's writable private mappings (pymalloc's arenas
and other anonymous memory, malloc's heap, libraries' writable data), the
physical frame each process maps there. A child's page is *copied* where its
frame differs from the arbiter's (one of the two wrote it since the fork;
the arbiter's own writes are counted apart: where both children still share
a frame the arbiter left). For each copied page it compares the two
processes' bytes word by word, and attributes:

* the page's 4 KiB to the objects of the fork's map lying on it, by kind of
  object and by the module that first reaches it (bytes no object of the
  map covers: ``no object``: free blocks, pymalloc's pool headers, malloc's
  own, objects the map misses);
* each differing word to what it is in its object: a reference count, the
  collector's header, a code object's header (its warm-up counter) or its
  bytecode (quickened instructions and inline caches), a dict's version or
  table pointer, a type's fields (its version tag, its subclasses, ...),
  another field, or no object at the fork
  (a block allocated since, or an allocator's header);
* each page to the causes of its differences: only reference counts, no
  difference left at all (written and put back: a count up and down, a
  block allocated and freed), or which other cause.

Run it from a directory without a ``balancer`` package (e.g. /tmp).
"""

from __future__ import annotations

import argparse
import bisect
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_proxy import start_nginx  # noqa: E402

from loadtest.measure import mapping_kind, process_tree, rollup_kb  # noqa: E402
from loadtest.procs import Processes, free_port, wait_for_port  # noqa: E402
from loadtest.routes import RouteFile, proxy_rule  # noqa: E402

HOST = "127.0.0.1"
PAGE = 4096
POOL = 16384  # pymalloc's pool in 3.11 (its header at the start)
PFN_MASK = (1 << 55) - 1
PRESENT = 1 << 63
KINDS = ("anonymous", "heap", "file data")  # of loadtest.measure.MAPPING_KINDS
# PyHeapTypeObject's fields (3.11) a process writes after the type is made
TYPE_FIELDS = {168: "flags", 352: "tp_cache", 360: "subclasses", 384: "version tag",
               872: "cached keys", 896: "__getitem__ cache"}
CODE_BASIC = 184  # PyCodeObject's fixed part in 3.11: its bytecode follows
WRAPPER = (
    "import os, runpy, sys\n"
    "sys.path.insert(0, {scripts!r})\n"
    "import cow_dump\n"
    "cow_dump.install({directory!r}, os.environ.get('COW_FILL') == '1',\n"
    "                 os.environ.get('COW_TAGS') == '1')\n"
    "sys.argv = ['balancer', *{argv!r}]\n"
    "runpy.run_module('balancer', run_name='__main__', alter_sys=True)\n"
)


@dataclass
class ObjectMap:
    """One fork's map (`scripts/cow_dump.py`), sorted by block start."""

    starts: list[int] = field(default_factory=list)
    # start, end, address, kind, label
    rows: list[tuple[int, int, int, str, str]] = field(default_factory=list)
    totals: Counter[str] = field(default_factory=Counter)  # bytes mapped, by kind of object

    @classmethod
    def read(cls, path: Path) -> ObjectMap:
        rows = []
        for line in path.read_text().splitlines():
            address, pre, size, kind, label = line.split("\t")
            start = int(address) - int(pre)
            rows.append((start, start + max(int(size), 1), int(address), kind, label))
        rows.sort()
        totals = Counter[str]()
        for start, end, _, kind, _ in rows:
            totals[kind.split(":")[0]] += end - start
        return cls([r[0] for r in rows], rows, totals)

    def covering(self, lo: int, hi: int) -> list[tuple[int, int, int, str, str]]:
        """The blocks overlapping [lo, hi)."""
        i = max(bisect.bisect_right(self.starts, lo) - 1, 0)
        found = []
        while i < len(self.rows) and self.rows[i][0] < hi:
            if self.rows[i][1] > lo:
                found.append(self.rows[i])
            i += 1
        return found

    def at(self, address: int) -> tuple[int, int, int, str, str] | None:
        i = bisect.bisect_right(self.starts, address) - 1
        if i >= 0 and self.rows[i][1] > address:
            return self.rows[i]
        return None


def mappings(pid: int) -> list[tuple[int, int, str]]:
    """The arbiter's writable private mappings of `KINDS`: (start, end, kind)."""
    found = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        if not fields[1].startswith("rw") or fields[1][3] != "p":
            continue
        kind = mapping_kind(fields[5] if len(fields) > 5 else "", fields[1])
        if kind in KINDS:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            found.append((lo, hi, kind))
    return found


def frames(pid: int, lo: int, hi: int) -> list[int]:
    """The physical frame of each page of [lo, hi) in `pid` (0: not present)."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(lo // PAGE * 8)
        raw = f.read((hi - lo) // PAGE * 8)
    words = memoryview(raw).cast("Q")
    return [w & PFN_MASK if w & PRESENT else 0 for w in words]


def page(mem: object, address: int) -> bytes:
    mem.seek(address)  # type: ignore[attr-defined]
    return mem.read(PAGE)  # type: ignore[attr-defined, no-any-return]


def word_cause(address: int, row: tuple[int, int, int, str, str] | None, kind: str,
               retyped: bool) -> str:
    """What the word at `address` is, in the block `row` of the fork's map
    (`retyped`: the object's type pointer differs now: its block was freed and
    holds another object)."""
    if row is None:
        return f"no object at the fork ({kind})" if address % POOL >= 48 or kind != "anonymous" \
            else "pymalloc pool header"
    _, _, obj, what, _ = row
    rel = address - obj
    if retyped and not what.startswith("("):
        return "object freed, its block reused"
    if rel < 0:
        return "collector's header"
    if rel == 0 and not what.startswith("("):
        return "reference count"
    if what.startswith("code:"):
        return ("code header (warm-up counter)" if rel < CODE_BASIC
                else "code bytecode (quickening, caches)")
    if what == "dict":
        return ("dict version/used" if rel in (16, 24)
                else "dict table pointer" if rel >= 32 else "dict")
    if what.startswith("(dict"):
        return "dict keys/values tables"
    if what.startswith("type:"):
        return f"type {TYPE_FIELDS.get(rel, 'other field')}"
    return f"{what.split(':')[0]} field"


@dataclass
class Report:
    pages: Counter[str] = field(default_factory=Counter)  # per mapping kind and state
    by_kind: Counter[str] = field(default_factory=Counter)  # bytes of copied pages
    by_label: Counter[str] = field(default_factory=Counter)
    words: Counter[str] = field(default_factory=Counter)  # differing words by cause
    page_causes: Counter[str] = field(default_factory=Counter)  # copied pages by cause set
    families: Counter[str] = field(default_factory=Counter)  # copied pages by `family`
    written: Counter[str] = field(default_factory=Counter)  # bytes of objects with a change
    put_back: Counter[str] = field(default_factory=Counter)  # bytes on pages without one


def attribute(arbiter: int, child: int, objects: ObjectMap, sibling: int | None) -> Report:
    report = Report()
    with open(f"/proc/{arbiter}/mem", "rb", buffering=0) as amem, \
            open(f"/proc/{child}/mem", "rb", buffering=0) as cmem:
        for lo, hi, kind in mappings(arbiter):
            try:
                mine, theirs = frames(arbiter, lo, hi), frames(child, lo, hi)
                others = frames(sibling, lo, hi) if sibling else [0] * len(mine)
            except OSError:
                continue
            for i, (a, c, s) in enumerate(zip(mine, theirs, others, strict=True)):
                if not a or not c:
                    continue
                if a == c:
                    report.pages[f"{kind} shared"] += 1
                    continue
                if c == s:  # both children still share it: the arbiter wrote
                    report.pages[f"{kind} written by the arbiter"] += 1
                    continue
                report.pages[f"{kind} copied"] += 1
                address = lo + i * PAGE
                try:
                    before, after = page(amem, address), page(cmem, address)
                except OSError:
                    continue
                covered = 0
                same = before == after
                for start, end, _, what, label in objects.covering(address, address + PAGE):
                    share = min(end, address + PAGE) - max(start, address)
                    covered += share
                    report.by_kind[what.split(":")[0]] += share
                    report.by_label[label] += share
                    if same:
                        report.put_back[f"{label} {what.split(':')[0]}"] += share
                if same:
                    share = "half or more" if covered >= PAGE // 2 else "less than half"
                    report.put_back[f"(pages in {kind}: objects on {share})"] += PAGE
                report.by_kind["no object"] += max(PAGE - covered, 0)
                report.by_label["no object"] += max(PAGE - covered, 0)
                causes = set()
                written = set()
                old, new = memoryview(before).cast("Q"), memoryview(after).cast("Q")
                for w in range(PAGE // 8):
                    if old[w] != new[w]:
                        at = address + 8 * w
                        row = objects.at(at)
                        cause = word_cause(at, row, kind, row is not None and retyped(
                            row[2], address, old, new))
                        report.words[cause] += 1
                        causes.add(cause)
                        if row is not None:
                            written.add(row)
                for start, end, _, _, label in written:
                    report.written[label] += end - start
                report.page_causes[page_cause(causes)] += 1
                report.families[family(causes)] += 1
    return report


def retyped(obj: int, address: int, old: memoryview, new: memoryview) -> bool:
    """Whether the type pointer of the object at `obj` differs (on this page)."""
    w = (obj + 8 - address) // 8
    return 0 <= w < len(old) and old[w] != new[w]


# a copied page's family: the first whose test one of its differences passes
FAMILIES = (
    ("code objects run (warm-up counter, quickening)", lambda c: c.startswith("code ")),
    ("types (version tags, caches)", lambda c: c.startswith("type ")),
    ("dicts (versions, tables)", lambda c: c.startswith("dict")),
    ("pymalloc blocks allocated or freed since (no object at the fork, pool headers)",
     lambda c: c in ("no object at the fork (anonymous)", "pymalloc pool header",
                     "object freed, its block reused")),
    ("malloc's heap and C data (no object at the fork)", lambda c: c.startswith("no object")),
    ("other objects' fields", lambda c: c != "reference count" and c != "collector's header"),
    ("reference counts (and collector's headers) only", lambda c: True),
)


def family(causes: set[str]) -> str:
    if not causes:
        return "no difference left: written and put back (counts up and down)"
    return next(name for name, test in FAMILIES if any(test(c) for c in causes))


def page_cause(causes: set[str]) -> str:
    if not causes:
        return "no difference left (written and put back)"
    if causes <= {"reference count"}:
        return "reference counts only"
    if causes <= {"reference count", "collector's header"}:
        return "reference counts and collector's headers only"
    rest = sorted(causes - {"reference count", "collector's header"})
    return "+".join(rest)


def mib(pages_or_bytes: float, unit: int = 1) -> str:
    return f"{pages_or_bytes * unit / 1048576:.2f}"


def print_report(title: str, report: Report, totals: Counter[str], top: int) -> None:
    copied = sum(n for k, n in report.pages.items() if k.endswith("copied"))
    print(f"\n== {title}: {mib(copied, PAGE)} MiB copied")
    for key in sorted(report.pages):
        print(f"  pages {key:40} {mib(report.pages[key], PAGE):>7} MiB")
    print("  copied pages' bytes by kind of object (MiB; of the kind's bytes in the map):")
    for what, n in report.by_kind.most_common(top):
        print(f"    {what:40} {mib(n)} of {mib(totals[what])}")
    print("  by the module that first reaches the object (MiB):")
    for label, n in report.by_label.most_common(top):
        print(f"    {label:40} {mib(n)}")
    print("  objects with a difference left, by the module that first reaches them (MiB):")
    for label, n in report.written.most_common(top):
        print(f"    {label:40} {mib(n)}")
    print("  pages without a difference left: their objects by module and kind (MiB):")
    for label, n in report.put_back.most_common(top):
        print(f"    {label:40} {mib(n)}")
    print("  differing 8-byte words by what they are:")
    for cause, n in report.words.most_common():
        print(f"    {cause:40} {n}")
    print("  copied pages by family (MiB):")
    for name, n in report.families.most_common():
        print(f"    {name:80} {mib(n, PAGE)}")
    print("  copied pages by the causes of their differences (MiB):")
    for cause, n in report.page_causes.most_common(top):
        print(f"    {cause:60} {mib(n, PAGE)}")


def start(procs: Processes, root: Path, tree: Path, backend: int, dumps: Path) -> tuple[int, int]:
    """`balancer serve` with the hook; (its pid, its port)."""
    port, mgmt = free_port(), free_port()
    routes = RouteFile(root / "routes.json", {"*": proxy_rule([f"{HOST}:{backend}"])})
    argv = ["serve", "--workers", "1", "--listen", f"{HOST}:{port}",
            "--management", f"{HOST}:{mgmt}", "--store", f"file:{routes.path}"]
    code = WRAPPER.format(scripts=str(ROOT / "scripts"), directory=str(dumps), argv=argv)
    proc = procs.start("balancer", [sys.executable, "-P", "-c", code], {"PYTHONPATH": str(tree)})
    wait_for_port(proc, port)
    return proc.popen.pid, port


def children(arbiter: int, dumps: Path) -> dict[str, tuple[int, ObjectMap]]:
    """The live children by role, each with the map of the fork that made it
    (the management process is forked before the worker)."""
    forks = dict(line.split()[::-1] for line in (dumps / "pids").read_text().splitlines())
    live = sorted((pid for pid in process_tree(arbiter) if pid != arbiter),
                  key=lambda pid: int(forks[str(pid)]))  # pids may wrap: the fork's order
    if len(live) != 2:
        raise SystemExit(f"expected 2 children, found {live}")
    return {role: (pid, ObjectMap.read(dumps / f"fork-{forks[str(pid)]}.tsv"))
            for role, pid in zip(("management", "worker"), live, strict=True)}


def measure(when: str, arbiter: int, dumps: Path, top: int) -> None:
    found = children(arbiter, dumps)
    pids = {role: pid for role, (pid, _) in found.items()}
    rollups = {"arbiter": rollup_kb(arbiter)} | {role: rollup_kb(pid) for role, pid in pids.items()}
    tree = sum(f["Pss"] for f in rollups.values()) / 1024
    print(f"\n{when}: Pss (Private) MiB " + ", ".join(
        f"{role} {f['Pss'] / 1024:.1f} ({(f['Private_Clean'] + f['Private_Dirty']) / 1024:.1f})"
        for role, f in rollups.items()) + f"; tree {tree:.1f}")
    for role, (pid, objects) in found.items():
        sibling = next(p for r, p in pids.items() if r != role)
        print_report(f"{role}, {when}", attribute(arbiter, pid, objects, sibling),
                     objects.totals, top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="the tree `balancer serve` runs from (PYTHONPATH)")
    parser.add_argument("--connections", type=int, default=1000,
                        help="wrk's connections (0: the idle reading only)")
    parser.add_argument("--duration", type=int, default=8, help="seconds of wrk")
    parser.add_argument("--settle", type=float, default=15.0,
                        help="seconds from the start to the idle reading")
    parser.add_argument("--top", type=int, default=12, help="rows per table")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: /proc/PID/pagemap shows page frames only to root")
    with tempfile.TemporaryDirectory(prefix="bench-cow-") as tmp:
        root = Path(tmp)
        dumps = root / "dumps"
        dumps.mkdir()
        procs = Processes(root / "logs")
        try:
            nginx = start_nginx(procs, root)
            arbiter, port = start(procs, root, args.tree.resolve(), nginx.port, dumps)
            time.sleep(args.settle)
            measure("idle", arbiter, dumps, args.top)
            if not args.connections:
                return
            load = threading.Thread(target=subprocess.run, args=(
                ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s",
                 f"http://{HOST}:{port}/index.html"],), kwargs={"capture_output": True})
            load.start()
            time.sleep(max(args.duration - 2, 1))
            measure(f"{args.connections} connections", arbiter, dumps, args.top)
            load.join(args.duration + 30)
        finally:
            procs.stop_all()


if __name__ == "__main__":
    main()
