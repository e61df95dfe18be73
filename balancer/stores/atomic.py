"""Replacing a store's file atomically: readers see the old file or the new one,
never a part, and a crash leaves no temporary file behind; and the signature by
which a reader sees that a file changed."""

from __future__ import annotations

import contextlib
import os
import tempfile

from balancer.stores.base import StoreUnavailable


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


def file_signature(path: str) -> tuple[int, ...] | None:
    """What changes whenever `path` is replaced or written (inode, size, times);
    None when there is no file. Raises StoreUnavailable when it cannot be looked at."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreUnavailable(f"{path}: {exc.strerror or exc}") from exc
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
