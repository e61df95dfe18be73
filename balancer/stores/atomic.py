"""Replacing a store's file atomically: readers see the old file or the new one,
never a part, and a crash leaves no temporary file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile


def write_atomically(path: str, body: bytes, mode: int | None = None) -> None:
    """Replace `path` with `body`: a temporary file beside it (created 0600, then
    `mode` if given), written, fsynced and renamed over `path`. Raises OSError."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
