"""Compiles the data plane's hot modules with mypyc (metadata: pyproject.toml).

The modules stay plain, type-checked Python: mypyc turns their classes into
native ones and their calls into C calls, which cuts the proxy's Python cost
per request by about a third (README, "Proxy speed against HAProxy"). Beside
them it builds two hand-written C extensions, ``balancer._sockio`` (the hot
path's recv and send without releasing the GIL; `balancer.sockcalls` falls back
to the socket module's calls without it) and ``balancer._evgil`` (gevent's loop
runs its callbacks in one hold of the GIL per batch; `balancer.evgil`). Set
``BALANCER_PURE=1`` to install everything interpreted (no C compiler needed,
slower).
"""

import importlib.machinery
import os
import threading
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# The per-request modules: the files mypy checks (pyproject.toml, [tool.mypy]).
COMPILED = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
# Hand-written C extensions: (module, source), built whenever the mypyc modules are.
C_EXTENSIONS = [("balancer._sockio", "balancer/_sockio.c"),
                ("balancer._evgil", "balancer/_evgil.c")]
JOBS = os.cpu_count() or 1  # compilers run at once
GROUP = "balancer_native"  # mypyc's group: its shared library holds every compiled module's code


def remove_inplace_builds(keep: list[str]) -> None:
    """Delete the extensions an earlier editable install left beside sources not
    in `keep` (Python would go on importing them instead of the .py)."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for ext in [*ROOT.glob(f"balancer/**/*{suffix}"), *ROOT.glob(f"{GROUP}*{suffix}")]:
            source = ext.relative_to(ROOT).as_posix()[: -len(suffix)] + ".py"
            group_lib = source.startswith(GROUP)  # mypyc's shared library
            hand_written = source[: -len(".py")] + ".c" in keep
            if not keep or (not group_lib and not hand_written and source not in keep):
                ext.unlink()


class BuildExt(build_ext):
    """Generates the mypyc modules' C when extensions are built, and compiles the
    extensions in parallel. pip runs setup.py three times for one install (its
    requirements, its metadata, the build): mypycify at import type-checked and
    generated the same C in each (a minute of CI's set-up)."""

    def finalize_options(self) -> None:
        modules = self.distribution.ext_modules
        # once, though a build may finalize more than one build_ext
        if modules and not any(ext.name.startswith(GROUP) for ext in modules):
            from mypyc.build import mypycify

            # multi_file: a C file per module, not one of 12 MB (75 s of one core);
            # the hot path runs the same instructions (docs/performance.md, 2026-12-06)
            self.distribution.ext_modules = [
                *mypycify(COMPILED, opt_level="3", group_name=GROUP, multi_file=True),
                *modules]
        if self.parallel is None:
            self.parallel = JOBS
        super().finalize_options()

    def build_extensions(self) -> None:
        """Each extension's sources compile at once too, `JOBS` compilers at a time
        (setuptools compiles one extension's sources one after the other)."""
        slots = threading.BoundedSemaphore(JOBS)
        compile_sources = self.compiler.compile

        def compile_each(sources: list[str], *args: Any, **kwargs: Any) -> list[str]:
            def one(source: str) -> list[str]:
                with slots:
                    return compile_sources([source], *args, **kwargs)
            with ThreadPoolExecutor(max(1, len(sources))) as pool:
                return [obj for objects in pool.map(one, sources) for obj in objects]

        self.compiler.compile = compile_each
        super().build_extensions()


def ext_modules() -> list[Extension]:
    """The hand-written extensions (BuildExt adds the mypyc ones), or none when pure."""
    if os.environ.get("BALANCER_PURE", "") not in ("", "0"):
        remove_inplace_builds(keep=[])
        return []
    remove_inplace_builds(keep=COMPILED + [source for _, source in C_EXTENSIONS])
    return [Extension(name, [source], extra_compile_args=["-O2"])
            for name, source in C_EXTENSIONS]


setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildExt})
