"""The package dependency rule (SPEC §1): `management` may import `balancer`,
never the reverse. Checked over the source, so a lazy import inside a function
is caught too."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import statement in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return sorted(found)


def imports_of(package: str, forbidden: str) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {module}"
            for path in sorted((ROOT / package).rglob("*.py"))
            for line, module in imported_modules(path)
            if module == forbidden or module.startswith(forbidden + ".")]


def test_the_data_plane_never_imports_management() -> None:
    assert imports_of("balancer", "management") == []


def test_the_check_finds_an_import(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from management.app import create_app\nimport management\n")
    assert [m for _, m in imported_modules(source)] == ["management.app", "management"]


def test_the_management_process_is_reached_through_the_entry_point() -> None:
    from balancer.entry_points import look_up
    from balancer.serve import MANAGEMENT_GROUP, load_management
    from management.process import CHILD

    assert load_management(look_up([MANAGEMENT_GROUP])[MANAGEMENT_GROUP]) is CHILD


def test_balancerctl_does_not_import_the_data_plane() -> None:
    """balancerctl is a client: the data plane's modules (the proxy, its
    connections, the heavy hitters' sketches) cost it 0.3 s of CPU per run."""
    code = ("import sys, management.ctl; "
            "print(sorted(m for m in sys.modules if m in DATA_PLANE))").replace(
        "DATA_PLANE", repr({"balancer.connection", "balancer.sketch", "balancer.diagnosis",
                            "balancer.actions.proxy", "balancer.serving"}))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
