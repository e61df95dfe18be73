"""The request framing fuzzer from the command line: a seeded batch of
tests/framefuzz.py's cases through a balancer (tests/fuzzpeer.py checks each),
and with ``--haproxy`` through HAProxy 2.6 as well (configured as
scripts/bench_proxy.py does), the two compared case by case; a disagreement
is confirmed by running its case again alone on both before it is reported.

    python -m tests.fuzzcli --cases 5000 --seed 4 [--cuts 12] [--haproxy]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from tests import refhttp
from tests.framefuzz import Case, case
from tests.fuzzpeer import (
    Outcome,
    RecordingBackend,
    check,
    run_batch,
    run_case,
    run_cuts,
    settled,
    shown,
    summary,
)

CONFIRM_IDS = 20_000_000  # the case ids of the cases run again (`confirmed`)


def start_haproxy(backend: str, workdir: Path) -> tuple[Any, Any, int]:
    """HAProxy in front of `backend`: its process registry, process and port."""
    from loadtest import configs
    from loadtest.procs import Processes, free_port, wait_for_port

    workdir.mkdir(parents=True, exist_ok=True)
    procs = Processes(workdir)
    port = free_port()
    conf = workdir / "haproxy.cfg"
    conf.write_text(configs.haproxy(port, [backend], 4096, 2000))
    proc = procs.start("haproxy", ["haproxy", "-db", "-f", str(conf)])
    wait_for_port(proc, port)
    return procs, proc, port


def diff(ours: list[Outcome], theirs: list[Outcome]) -> str:
    """The cases HAProxy and the balancer treated differently: by kind and by why
    the reference reading refuses the request where they part (or the
    operators that made it, when it reads it), the shortest case of each."""
    kinds: Counter = Counter()
    examples: dict[tuple, Case] = {}
    for a, b in zip(ours, theirs, strict=False):
        if a.signature() == b.signature():
            continue
        ahead, behind = len(a.forwarded), len(b.forwarded)
        if ahead != behind:
            kind = "balancer forwards more" if ahead > behind else "haproxy forwards more"
        elif a.statuses != b.statuses:
            kind = (f"same forwarding, answers {a.statuses[ahead:]} (balancer) vs "
                    f"{b.statuses[behind:]} (haproxy)")
        else:
            kind = "forwarded differently"
        reading = refhttp.read_stream(a.case.data)
        why = (reading.reason if len(reading.requests) <= min(ahead, behind)
               else "reading accepts it: " + "+".join(a.case.labels))
        key = (kind, why)
        kinds[key] += 1
        if key not in examples or len(a.case.data) < len(examples[key].data):
            examples[key] = a.case
    return "\n".join(f"x{count} {kind}: {why}\n    {shown(examples[kind, why].data)}"
                     for (kind, why), count in kinds.most_common())


def confirmed(ours: list[Outcome], theirs: list[Outcome], sides: list[tuple[int, Any]],
              seed: int, quiet: float) -> tuple[list[Outcome], list[Outcome]]:
    """The cases on which the two disagree still when run again alone, each side
    `(port, backend)` (a batch's pooled backend connections, closed by the
    backend after bytes it could not read, can change an answer)."""
    again: list[list[tuple[Case, list[int], bool | None]]] = [[], []]
    for a, b in zip(ours, theirs, strict=False):
        if a.signature() == b.signature():
            continue
        n = a.case.case_id
        for runs, (port, backend) in zip(again, sides, strict=True):
            item = case(seed, n, CONFIRM_IDS + n)
            runs.append((item, *run_case(port, backend, item, quiet)))
    for _, backend in sides:
        settled(backend)
    a_runs, b_runs = again
    (_, a_backend), (_, b_backend) = sides
    return ([check(item, statuses, closed, a_backend.of_case(item.case_id))
             for item, statuses, closed in a_runs],
            [check(item, statuses, closed, b_backend.of_case(item.case_id))
             for item, statuses, closed in b_runs])


def main() -> int:
    from tests.support import Balancer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--haproxy", action="store_true", help="compare with HAProxy 2.6")
    parser.add_argument("--cuts", type=int, default=0,
                        help="cases (of 200 bytes at most) also sent cut at every byte")
    parser.add_argument("--quiet", type=float, default=1.0,
                        help="seconds a proxy may be silent before a case ends")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        backend = RecordingBackend()
        bal = Balancer(Path(tmp), {"*": {"action": "proxy", "backends": [backend.address]}})
        theirs_backend = RecordingBackend()
        procs, proc, port = (start_haproxy(theirs_backend.address, Path(tmp) / "haproxy")
                             if args.haproxy else (None, None, 0))
        try:
            ours = run_batch(bal.port, backend, args.seed, args.cases, quiet=args.quiet)
            ours_cut = run_cuts(bal.port, backend, args.seed, args.cuts)
            print("balancer:", summary(ours))
            if args.cuts:
                print("balancer, cut at every byte:", summary(ours_cut))
            if args.haproxy:
                theirs = run_batch(port, theirs_backend, args.seed, args.cases,
                                   quiet=args.quiet)
                print("haproxy:", summary(theirs))
                print("disagreements, each confirmed alone:\n" + diff(*confirmed(
                    ours, theirs, [(bal.port, backend), (port, theirs_backend)],
                    args.seed, args.quiet)))
        finally:
            bal.stop()
            if procs is not None:
                procs.stop(proc)
    return 1 if any(o.faults for o in ours + ours_cut) else 0


if __name__ == "__main__":
    sys.exit(main())
