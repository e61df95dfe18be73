"""Workers that did not answer their control socket, remembered (`ClusterRuntime`).

A worker stopped (``SIGSTOP``) or hung accepts nothing: every ask waits its
whole timeout, and asks that give up stay queued in its socket's backlog. So
the management process remembers such a worker as silent and its asks skip it:
the API answers at once with the others' figures (and its last known
counters: `management.kept`) and names it (``lagging``).

Invariants:
* A worker is silent from a failed ask (no answer in time, or none usable)
  until it answers again; one that is gone (nothing listens on its socket, or
  the socket file went) is forgotten.
* One prober per silent worker, one ask outstanding at a time: ``version``
  (cheap), waiting `PROBE_FIRST` seconds, then twice as long each time up to
  `PROBE_LAST`. So a resumed worker answers at once (a probe is waiting), and a
  stopped one collects at most one abandoned ask per probe; the worker skips
  asks whose client has gone (`balancer.control`).
* The prober ends when the worker answers or goes: nothing outlives the worker.
* Verdicts follow the order the asks began in (`ask`: a generation each), not
  the order they ended in: an ask's verdict never overwrites that of an ask
  begun later. Bug: a survey's answer, decoded for a second or more, was
  noted "answering" after a newer ask had found the worker silent (stopped
  meanwhile), and the next ask waited a whole timeout again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import gevent

from balancer.control import ask_why, pid_of

log = logging.getLogger("balancer.management")

PROBE_FIRST = 0.5  # seconds the first probe of a silent worker waits
PROBE_LAST = 30.0  # and the longest any probe waits
Ask = tuple[int, float]  # an ask's generation (the order asks began in) and its unix time


class SilentWorkers:
    """The control sockets (paths) of workers that did not answer, probed until they do."""

    def __init__(self, on_answer: Callable[[dict[str, Any]], None]) -> None:
        self.on_answer = on_answer  # a probe's answer to ``version``
        self.silent: dict[str, tuple[float, str]] = {}  # path → (since: unix time, why)
        self.probers: dict[str, gevent.Greenlet] = {}
        self.asks = 0  # asks begun: the last one's generation
        self.verdicts: dict[str, int] = {}  # path → the generation its last verdict came from

    def ask(self) -> Ask:
        """A new ask's generation and time, to `note` its outcome with."""
        self.asks += 1
        return self.asks, time.time()

    def answering(self, paths: Iterable[str]) -> list[str]:
        """The paths of `paths` that are not silent (those to ask)."""
        return [path for path in paths if path not in self.silent]

    def lagging(self, paths: Iterable[str]) -> list[dict[str, Any]]:
        """``{"pid", "version": None, "reason"}`` for each silent worker of `paths`
        (every worker listed: the verdicts of the others are forgotten, but those of
        silent ones, their probers' until they go: bug, a listing without a socket,
        the run directory made again, let an older ask's answer end a newer silence)."""
        listed = list(paths)
        self.verdicts = {path: generation for path, generation in self.verdicts.items()
                         if path in self.silent or path in listed}
        now = time.time()
        return [{"pid": pid_of(path), "version": None,
                 "reason": f"not answering for {now - self.silent[path][0]:.1f}s "
                           f"({self.silent[path][1]}): skipped until it answers again"}
                for path in listed if path in self.silent]

    def note(self, path: str, reply: dict[str, Any] | None, why: str, asked: Ask) -> None:
        """Remember how an ask of `path` begun as `asked` (`ask`) went
        (`balancer.control.ask_why`'s result), unless an ask begun later said."""
        generation, since = asked
        if generation < self.verdicts.get(path, 0):
            return
        self.verdicts[path] = generation
        if reply is not None or why == "gone":
            self.silent.pop(path, None)
            return
        if path not in self.silent:
            self.silent[path] = (since, why)
            log.warning("worker %s does not answer its control socket (%s): the management "
                        "API leaves it out until it answers again", pid_of(path), why)
            if path not in self.probers:
                self.probers[path] = gevent.spawn(self._probe, path)

    def _probe(self, path: str) -> None:
        """Ask `path` until it answers or goes, each wait twice the last (bounded)."""
        wait = PROBE_FIRST
        try:
            while path in self.silent:
                started, asked = time.monotonic(), self.ask()
                reply, why = ask_why(path, "version", wait)
                if reply is not None:
                    self.on_answer(reply)
                    log.warning("worker %s answers again after %.1fs", pid_of(path),
                                time.time() - self.silent.get(path, (time.time(), ""))[0])
                elif not os.path.exists(path):
                    why = "gone"
                self.note(path, reply, why, asked)
                if path not in self.silent:
                    return
                # a refused or broken ask returns early: wait out the rest of its turn
                gevent.sleep(max(0.0, wait - (time.monotonic() - started)))
                wait = min(wait * 2, PROBE_LAST)
        finally:
            self.probers.pop(path, None)
