"""Outside probe of the routes file under operators and deploy tools (2026-12-07).
Behaviour pinned, each against a running balancer (2 workers):

* Kubernetes ConfigMap style: the path is a link through ``..data``, a link
  to a timestamped directory that is swapped atomically (a new directory, a
  new ``..data`` renamed over the old one, the old directory removed): every
  worker serves the new table, with no problem left reported.
* The file replaced by a directory (``rm f; mkdir f``): reported, the last
  table served; the file put back is followed again.
* A file written in place in two steps (truncated, then written, as an
  editor that keeps the inode does), the version raised: the empty file
  reported meanwhile, the last table served, the edit served once whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from tests.support import Balancer, request, wait_for


def table(version: int, body: str) -> str:
    return json.dumps({"version": version,
                       "hosts": {"app.test": {"action": "static", "body": body}}})


def serves(balancer: Balancer, body: str) -> bool:
    return all(request(balancer.port, host="app.test", timeout=5)[2] == body.encode()
               for _ in range(4))


def start(tmp_path: Path, path: Path) -> Balancer:
    return Balancer(tmp_path, args=["--workers", "2"], store=f"file:{path}")


def configmap(root: Path, stamp: str, text: str) -> None:
    """What the kubelet does: the data in a new directory, ``..data`` swapped to it."""
    new = root / f"..{stamp}"
    new.mkdir()
    (new / "routes.json").write_text(text)
    old = os.readlink(root / "..data") if (root / "..data").is_symlink() else None
    os.symlink(new.name, root / "..data_tmp")
    os.replace(root / "..data_tmp", root / "..data")
    if old is not None:
        shutil.rmtree(root / old)


def test_a_configmap_swap_is_followed(tmp_path: Path) -> None:
    root = tmp_path / "config"
    root.mkdir()
    configmap(root, "2026_12_07_1", table(1, "one"))
    (root / "routes.json").symlink_to("..data/routes.json")
    balancer = start(tmp_path, root / "routes.json")
    try:
        wait_for(lambda: serves(balancer, "one"), what="the first table")
        for n in range(2, 5):
            configmap(root, f"2026_12_07_{n}", table(n, f"v{n}"))
            wait_for(lambda n=n: serves(balancer, f"v{n}"), what=f"version {n}")
        wait_for(lambda: balancer.store_problem() == "", what="no problem left")
    finally:
        balancer.stop()


def test_a_file_replaced_by_a_directory_then_put_back(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text(table(1, "one"))
    balancer = start(tmp_path, path)
    try:
        wait_for(lambda: serves(balancer, "one"), what="the first table")
        path.unlink()
        path.mkdir()
        wait_for(lambda: balancer.store_problem() != "", what="the problem reported")
        assert serves(balancer, "one")
        assert balancer.proc.poll() is None
        path.rmdir()
        path.write_text(table(2, "two"))
        wait_for(lambda: serves(balancer, "two"), what="the file followed again")
        wait_for(lambda: balancer.store_problem() == "", what="no problem left")
    finally:
        balancer.stop()


def test_a_file_written_in_place_in_two_steps(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text(table(1, "one"))
    balancer = start(tmp_path, path)
    try:
        wait_for(lambda: serves(balancer, "one"), what="the first table")
        inode = path.stat().st_ino
        with open(path, "r+") as f:
            f.truncate(0)
            f.flush()
            os.fsync(f.fileno())
            wait_for(lambda: balancer.store_problem() != "", what="the empty file reported")
            assert serves(balancer, "one")
            f.write(table(2, "two"))
        assert path.stat().st_ino == inode
        wait_for(lambda: serves(balancer, "two"), what="the edit served")
        wait_for(lambda: balancer.store_problem() == "", what="no problem left")
        status: Any = balancer.api("GET", "/api/v1/hosts")[1]
        assert status["version"] == 2
    finally:
        balancer.stop()
