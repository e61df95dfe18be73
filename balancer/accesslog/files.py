"""The access log's file calls, made in gevent's thread pool by its writer
(`balancer.accesslog.writer`): they may block (a FIFO nobody reads, a hung
mount), never raise, and answer with values."""

from __future__ import annotations

import os
from typing import Final

OPEN_FLAGS: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def open_path(path: str, beside: int) -> tuple[int, str]:
    """Open the access log's path (in the thread pool): its descriptor, or -1 and
    why not; never raises. `beside`, unless -1: the descriptor a write blocks on,
    and a path that still names that file is not opened again (two writes out to
    one file would interleave their records)."""
    try:
        fd = os.open(path, OPEN_FLAGS, 0o644)
    except OSError as exc:
        return -1, exc.strerror or str(exc)
    if beside >= 0:
        try:
            new, old = os.fstat(fd), os.fstat(beside)
            same = (new.st_dev, new.st_ino) == (old.st_dev, old.st_ino)
        except OSError:
            same = True
        if same:
            os.close(fd)
            return -1, "the path still names the file the write blocks on"
    return fd, ""


def write_all(fd: int, data: bytes) -> tuple[int, OSError | None]:
    """Write all of ``data`` to ``fd`` (os.write may write part of it): how many
    bytes were written, and the OSError that stopped it (ENOSPC, EFBIG past
    RLIMIT_FSIZE: SIGXFSZ is ignored, as Python starts; EPIPE), or None."""
    view, written = memoryview(data), 0
    try:
        while written < len(data):
            written += os.write(fd, view[written:])
    except OSError as exc:
        return written, exc
    return written, None
