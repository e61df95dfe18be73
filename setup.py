"""Compiles the data plane's hot modules with mypyc (metadata: pyproject.toml).

The modules stay plain, type-checked Python: mypyc turns their classes into
native ones and their calls into C calls, which cuts the proxy's Python cost
per request by about a third (README, "Proxy speed against HAProxy"). Beside
them it builds one hand-written C extension, ``balancer._sockio`` (the hot
path's recv and send without releasing the GIL; `balancer.sockcalls` falls back
to the socket module's calls without it). Set ``BALANCER_PURE=1`` to install
everything interpreted (no C compiler needed, slower).
"""

import importlib.machinery
import os
import tomllib
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
# The per-request modules: the files mypy checks (pyproject.toml, [tool.mypy]).
COMPILED = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
# Hand-written C extensions: (module, source), built whenever the mypyc modules are.
C_EXTENSIONS = [("balancer._sockio", "balancer/_sockio.c")]


def remove_inplace_builds(keep: list[str]) -> None:
    """Delete the extensions an earlier editable install left beside sources not
    in `keep` (Python would go on importing them instead of the .py)."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for ext in [*ROOT.glob(f"balancer/**/*{suffix}"), *ROOT.glob(f"balancer_native*{suffix}")]:
            source = ext.relative_to(ROOT).as_posix()[: -len(suffix)] + ".py"
            group_lib = source.startswith("balancer_native")  # mypyc's shared library
            hand_written = source[: -len(".py")] + ".c" in keep
            if not keep or (not group_lib and not hand_written and source not in keep):
                ext.unlink()


def ext_modules() -> list:
    if os.environ.get("BALANCER_PURE", "") not in ("", "0"):
        remove_inplace_builds(keep=[])
        return []
    remove_inplace_builds(keep=COMPILED + [source for _, source in C_EXTENSIONS])
    from mypyc.build import mypycify

    hand_written = [Extension(name, [source], extra_compile_args=["-O2"])
                    for name, source in C_EXTENSIONS]
    return mypycify(COMPILED, opt_level="3", group_name="balancer_native") + hand_written


setup(ext_modules=ext_modules())
