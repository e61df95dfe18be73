"""Replacing a store's file atomically: readers see the old file or the new one,
never a part, and a crash leaves no temporary file behind; reading one, never
more than `MAX_FILE_BYTES`; and the signature by which a reader sees that a
file changed."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from typing import IO, Any

from balancer.stores.base import StoreFull, StoreUnavailable

# the most a store's file may hold: 40 times the routes file of 100,000 hosts (6 MiB)
MAX_FILE_BYTES = 256 << 20
GROWTH_SLICE = 1 << 20  # what `read_capped` reads at a time past the fstat size


class TooLarge(ValueError):
    """A store's file holds more than `MAX_FILE_BYTES`: none this balancer wrote."""

    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes, more than the {MAX_FILE_BYTES >> 20} MiB a store's "
                         f"file may hold")


def write_atomically(path: str, body: bytes, mode: int | None = None) -> None:
    """Replace `path` with `body`: a temporary file beside it (created 0600, then
    `mode` if given), written, fsynced and renamed over `path`. A symlink is
    followed: the file it names is replaced and the link kept (bug: the first
    write put a regular file in place of the link, so the file the link named,
    which other readers may use, silently stayed at the old table). Raises OSError;
    EFBIG, writing nothing, for a body over `MAX_FILE_BYTES` (no reader would take it)."""
    if len(body) > MAX_FILE_BYTES:
        raise OSError(errno.EFBIG, str(TooLarge(len(body))), path)
    path = os.path.realpath(path)
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


# what a write's errno means when the file has no room, and where to look
NO_ROOM = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the user's disk quota is used up",
    errno.EFBIG: "over the process's file size limit: ulimit -f, systemd LimitFSIZE=",
}


def write_store_file(path: str, body: bytes, mode: int | None = None) -> None:
    """`write_atomically`, its OSError turned into the store error: `StoreFull`
    when the file found no room, `StoreUnavailable` otherwise; either way the old
    file is intact and no temporary file is left."""
    try:
        write_atomically(path, body, mode)
    except OSError as exc:
        raise cannot_write(path, exc) from exc


def cannot_write(path: str, exc: OSError) -> StoreUnavailable:
    """The store error of a failed write of `path`, naming the cause (the one place
    a write's errno is looked at). Bug: a full disk was a 503 "store unavailable"
    like an unreachable store, and a file size limit said only "File too large"."""
    why = f"{path}: cannot write: {exc.strerror or exc}"
    if exc.errno in NO_ROOM:
        own = exc.strerror == os.strerror(exc.errno)  # not a reason of ours (`TooLarge`)
        return StoreFull(f"{why} ({NO_ROOM[exc.errno]})" if own else why)
    return StoreUnavailable(why)


def open_regular(path: str, mode: str = "rb") -> IO[Any]:
    """`open(path, mode)` to read a store's file, refusing anything but a regular
    file (a symlink to one is followed). Bug: a FIFO put in its place blocked
    the process opening it (every worker and the management process: no request
    was answered) until a writer came, and a device such as /dev/zero was read
    until memory ran out. Raises OSError (FileNotFoundError when missing)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return open(fd, mode)  # noqa: SIM115 - the caller's `with` closes it


def read_capped(f: IO[bytes]) -> bytes:
    """What the open file `f` holds; `TooLarge`, reading nothing, when that is more
    than `MAX_FILE_BYTES`. Bug: a huge routes file (a 2 GiB sparse file, a log
    written to the wrong path) was read whole by the management process and
    every worker, each at once, before it was found corrupt: 4 GB of memory
    apiece and 50 s for 2 GiB; a worker reads its store in its loop, so a 1 GiB
    file held its requests up to 10 s."""
    size = os.fstat(f.fileno()).st_size
    if size > MAX_FILE_BYTES:
        raise TooLarge(size)
    # One byte more than fstat said: a file that grew after the fstat is read
    # on in slices. Bug: `read(MAX_FILE_BYTES + 1)` allocated 256 MiB for every
    # read, however small the file (virtual, but it fails under `ulimit -v`).
    data = f.read(size + 1)
    while size < len(data) <= MAX_FILE_BYTES:
        more = f.read(min(GROWTH_SLICE, MAX_FILE_BYTES + 1 - len(data)))
        if not more:
            break
        data += more
    if len(data) > MAX_FILE_BYTES:
        raise TooLarge(len(data))
    return data


def read_regular(path: str) -> bytes:
    """What the regular file `path` holds (`open_regular`, `read_capped`).
    Raises OSError, or `TooLarge` (a ValueError, as a file that is no JSON)."""
    with open_regular(path) as f:
        return read_capped(f)


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
