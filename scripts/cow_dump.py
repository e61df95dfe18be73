"""`scripts/bench_cow.py`'s hook in the arbiter: a map of its objects at each fork.

``install(directory)`` replaces ``os.fork`` in the process that runs
``balancer serve`` (before it starts). At each fork the hook first forks a
throwaway child, which is a snapshot of the arbiter at that moment: it
writes every object it can find (address, how many bytes precede the
address, size, kind, the module that reaches it first) to
``directory/fork-N.tsv`` and exits; the arbiter waits for it, then forks as
asked and appends ``N PID`` to ``directory/pids``. So the map costs the
arbiter's own memory nothing (no object of the map is ever made in it);
only this module's few functions are.

Objects are found from every module (breadth first, so each object is
labelled with the first module that reaches it: its top-level package, the
balancer's own modules by name), then
from `gc.get_objects` (labelled ``(unreached)``), following
`gc.get_referents` and, for code objects, which the collector does not
traverse in CPython 3.11, their fields (read at their 3.11 offsets). Blocks
that are no objects are listed too: a dict's keys table and split values,
a list's item array, a set's table (kinds in parentheses). Interned
strings only the interpreter's table holds are not found (they show as
"no object" in the report).
"""

from __future__ import annotations

import gc
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

GC_HEAD = 16  # PyGC_Head before a tracked type's objects
MANAGED_DICT = 1 << 4  # Py_TPFLAGS_MANAGED_DICT: two more pointers before the GC head
HAVE_GC = 1 << 14
# PyCodeObject (3.11): fields the collector does not traverse and Python does not show
CODE_LOCALSPLUSNAMES, CODE_LOCALSPLUSKINDS = 96, 104
CODE_FIELDS = ("co_consts", "co_names", "co_exceptiontable", "co_filename", "co_name",
               "co_qualname", "co_linetable")


BALLAST: list[object] = []


def install(directory: str, fill: bool = False, tags: bool = False) -> None:
    """Map the objects at each of this process's forks into `directory`;
    with `fill`, first fill pymalloc's used pools (`fill_pools`), with `tags`
    give every type its version tag (`tag_types`)."""
    fork = os.fork
    count = [0]
    parent = os.getpid()

    def mapped_fork() -> int:
        if os.getpid() != parent:
            return fork()
        if fill:
            fill_pools()
        if tags:
            tag_types()
        count[0] += 1
        dumper = fork()
        if dumper == 0:
            try:
                dump(os.path.join(directory, f"fork-{count[0]}.tsv"))
            finally:
                os._exit(0)
        os.waitpid(dumper, 0)
        pid = fork()
        if pid:
            with open(os.path.join(directory, "pids"), "a") as f:
                f.write(f"{count[0]} {pid}\n")
        return pid

    os.fork = mapped_fork


def free_blocks() -> dict[int, int]:
    """pymalloc's free blocks in used pools, by block size (`sys._debugmallocstats`)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out:
        saved = os.dup(2)
        os.dup2(out.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        found = {}
        for line in out.read().split("\n\n")[1].splitlines()[3:]:
            fields = line.split()
            found[int(fields[1])] = int(fields[4])
        return found


def fill_pools() -> None:
    """Take every free block of pymalloc's used pools (kept in `BALLAST`), so
    that what a child allocates goes to pools of its own instead of writing
    onto pages it shares: the experiment ``COW_FILL=1``."""
    for size, free in free_blocks().items():
        if size == 16:
            BALLAST.extend(object() for _ in range(free))
        elif size == 32:
            BALLAST.extend(10**6 + i for i in range(free))
        else:
            BALLAST.extend(bytes(size - 33) for _ in range(free))


def tag_types() -> None:
    """Look a missing attribute up on every type, which gives it (and its
    bases) a version tag in the arbiter instead of in each child that looks a
    method up on it: the experiment ``COW_TAGS=1``."""
    types = {type(o) for o in gc.get_objects()}
    types.update(o for o in gc.get_objects() if isinstance(o, type))
    for cls in types:
        getattr(cls, "__cow_absent__", None)


def dump(path: str) -> None:
    """In the throwaway child: write the map (see the module's docstring)."""
    import ctypes

    gc.unfreeze()  # the frozen objects are in no generation `get_objects` lists
    seen: set[int] = set()
    with open(path + ".part", "w") as out:
        def write(address: int, pre: int, size: int, kind: str, label: str) -> None:
            out.write(f"{address}\t{pre}\t{size}\t{kind}\t{label}\n")

        tracked = gc.get_objects()
        seen.update((id(seen), id(tracked), id(out)))  # the map's own objects
        modules = [(top(name), m) for name, m in list(sys.modules.items()) if m is not None]
        for roots in (modules, [("(unreached)", o) for o in tracked]):
            queue: deque[tuple[str, Any]] = deque(roots)
            while queue:
                label, obj = queue.popleft()
                if id(obj) in seen:
                    continue
                seen.add(id(obj))
                write(id(obj), *shape(obj), describe(obj), label)
                for block, size, kind in blocks(obj, ctypes):
                    if block not in seen:
                        seen.add(block)
                        write(block, 0, size, kind, label)
                queue.extend((label, r) for r in referents(obj, ctypes))
    os.rename(path + ".part", path)


def top(module: str) -> str:
    """A module's label: its top-level package (the balancer's: its module)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] in ("balancer", "management") else parts[0]


def shape(obj: Any) -> tuple[int, int]:
    """(bytes before the object's address, the block's size with them)."""
    flags = type(obj).__flags__
    pre = (GC_HEAD if flags & HAVE_GC else 0) + (16 if flags & MANAGED_DICT else 0)
    if type(obj) in (dict, list, set):  # their tables are blocks of their own
        return pre, pre + type(obj).__basicsize__
    try:
        return pre, sys.getsizeof(obj)
    except Exception:
        return pre, pre + type(obj).__basicsize__


def describe(obj: Any) -> str:
    """The object's type, and for code, functions and types where they come from."""
    kind = type(obj).__name__
    if kind == "code":
        return f"code:{obj.co_filename}"
    if kind == "function":
        return f"function:{getattr(obj, '__module__', None)}"
    if isinstance(obj, type):
        return f"type:{obj.__module__}"
    return kind


def blocks(obj: Any, ctypes: Any) -> Iterator[tuple[int, int, str]]:
    """The separate allocations a dict, list or set points to: (address, size, kind)."""
    word: Callable[[int], int] = lambda at: ctypes.c_void_p.from_address(at).value or 0  # noqa: E731
    base = id(obj)
    if type(obj) is dict:
        keys = word(base + 32)
        if keys:
            log2 = ctypes.c_uint8.from_address(keys + 8).value
            log2_index = ctypes.c_uint8.from_address(keys + 9).value
            general = ctypes.c_uint8.from_address(keys + 10).value == 0
            usable = ((1 << log2) << 1) // 3
            yield keys, 32 + (1 << log2_index) + usable * (24 if general else 16), "(dict keys)"
        values = word(base + 40)
        if values:
            yield values - 8, 8 + 8 * len(obj), "(dict values)"
    elif type(obj) is list:
        items = word(base + 24)
        if items:
            yield items, 8 * ctypes.c_ssize_t.from_address(base + 32).value, "(list items)"
    elif type(obj) is set or type(obj) is frozenset:
        table = word(base + 40)
        if table and table != base + 64:  # not its small table inside the object
            yield table, 16 * (ctypes.c_ssize_t.from_address(base + 32).value + 1), "(set table)"


def referents(obj: Any, ctypes: Any) -> list[Any]:
    found = gc.get_referents(obj)
    if type(obj).__name__ == "code":
        found += [getattr(obj, name) for name in CODE_FIELDS]
        for at in (CODE_LOCALSPLUSNAMES, CODE_LOCALSPLUSKINDS):
            pointer = ctypes.c_void_p.from_address(id(obj) + at).value
            if pointer:
                found.append(ctypes.cast(pointer, ctypes.py_object).value)
    return found
