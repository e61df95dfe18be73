"""A gevent server whose accept outlives running out of descriptors.

gevent logs a traceback for every accept that fails (EMFILE under a lowered
`ulimit -n` or a `prlimit` on the running process) and retries within 10 ms,
backing off to a second: a page of tracebacks a second, outside the log
format. `RestingServer` logs one line per episode (failures less than
`EPISODE_GAP` apart) and rests `ACCEPT_PAUSE`
seconds on a fresh timer, as the data plane's listeners do
(`balancer.accepting.Listener`); a connection aborted before its accept is
skipped. Used by the management API and the workers' control sockets.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent
from gevent.server import StreamServer

from balancer.descriptors import ACCEPT_PAUSE, is_exhausted, is_skipped

log = logging.getLogger("balancer")
EPISODE_GAP = 10.0  # seconds without a failed accept that end an episode


class RestingServer(StreamServer):
    """gevent's StreamServer with a quiet, resting accept (put it first in the bases
    of a subclass of another gevent server, e.g. `WSGIServer`)."""

    failed_at = -EPISODE_GAP  # when an accept last ran out (monotonic)
    remedy = f"pausing accepts for {ACCEPT_PAUSE} s at a time"
    pause_timer: Any = None

    def do_read(self) -> Any:
        try:
            return super().do_read()
        except OSError as exc:
            if is_exhausted(exc):
                self.out_of_descriptors(exc)
            elif not is_skipped(exc):
                raise
            return None

    def out_of_descriptors(self, exc: OSError) -> None:
        """Tell the episode once; make room, or stop accepting for `ACCEPT_PAUSE` s."""
        now = time.monotonic()
        if now - self.failed_at >= EPISODE_GAP:  # a new episode: told once
            log.error("accept on %s failed: %s; %s until descriptors free up", self.address,
                      exc.strerror or exc, self.remedy)
        self.failed_at = now
        if self.make_room():
            return  # the next accept (at once) takes the descriptor freed
        self.stop_accepting()
        if self.pause_timer is not None and self.pause_timer.active:
            return
        if self.pause_timer is not None:  # a fired gevent timer started again fires at once
            self.pause_timer.close()
        self.pause_timer = gevent.get_hub().loop.timer(ACCEPT_PAUSE)
        self.pause_timer.start(self.resume)

    def make_room(self) -> bool:
        """Close a connection to free a descriptor (none here); True if one was."""
        return False

    def resume(self) -> None:
        if self.started:
            self.start_accepting()

    def close(self) -> None:
        if self.pause_timer is not None:
            self.pause_timer.close()
            self.pause_timer = None
        super().close()
