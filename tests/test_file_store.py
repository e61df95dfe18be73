"""File store specifics: atomic writes, corrupt files, many writer processes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from balancer.stores import (
    CorruptStore,
    StoreLost,
    StoreUnavailable,
    StoreUrlError,
    TableData,
    open_store,
)
from balancer.stores.file import FileStore
from balancer.stores.snapshot import Snapshot
from tests.conftest import wait_until
from tests.test_store_contract import GONE, WEB, Watcher

REPO = Path(__file__).resolve().parent.parent


def test_a_missing_file_is_created_empty(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    FileStore(str(path))
    assert json.loads(path.read_text()) == {"version": 0, "hosts": {}}


def test_file_url_forms(tmp_path: Path) -> None:
    assert open_store(f"file:{tmp_path}/a.json").path == f"{tmp_path}/a.json"
    assert open_store(f"file://{tmp_path}/b.json").path == f"{tmp_path}/b.json"


def test_a_missing_directory_is_unavailable_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match=f"the directory {tmp_path / 'nope'} does not"):
        FileStore(str(tmp_path / "nope" / "routes.json"))
    with pytest.raises(StoreUrlError, match="does not exist"):  # a bad setting for serve
        open_store(f"file:{tmp_path}/nope/routes.json")


def test_writes_are_whole_files_leaving_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    store = FileStore(str(path))
    path.chmod(0o640)
    store.put_host("web.example.com", WEB)
    assert json.loads(path.read_text()) == {"version": 1, "hosts": {"web.example.com": WEB}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routes.json", "routes.json.lock"]
    assert path.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize(("content", "reason"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected an object"),
    ('{"hosts": {}}', "expected an object"),
    ('{"version": "7", "hosts": {}}', "version must be an integer"),
    ('{"version": 3, "hosts": []}', "hosts: must be an object"),
    ('{"version": 3, "hosts": {"a.com": {"action": "teleport"}}}', "action: must be one of"),
    ('{"version": 3, "hosts": {"a.com": {"action": "proxy", "backends": ["x"]}}}',
     "backends[0]"),
    pytest.param('{"version": 3, "hosts": {"a.com": {"action": "static", "status": %s}}}'
                 % ("1" * 4400), "not valid JSON: Exceeds the limit (4300 digits)",
                 id="huge-number"),  # ValueError, not JSONDecodeError
    pytest.param('{"version": %s, "hosts": {}}' % ("9" * 5000), "not valid JSON",
                 id="huge-version"),
    pytest.param('{"version": 3, "hosts": {"a.com": %s}}' % ("[" * 100_000 + "]" * 100_000),
                 "not valid JSON: nested too deeply", id="deep"),  # RecursionError
    pytest.param('{"version": 3, "hosts": {"a.com": {"action": "static", "x": %s}}}'
                 % ("[" * 500 + "]" * 500), "invalid table", id="nested-but-decodable"),
    # a key named twice: json kept the last one, silently
    pytest.param('{"version": 3, "hosts": {"a.com": {"action": "empty", "status": 403},\n'
                 ' "b.com": {"action": "empty"}, "a.com": {"action": "empty"}}}',
                 'the host "a.com" is listed twice in "hosts"', id="host-twice"),
    pytest.param('{"version": 3, "hosts": {"a.com": {"action": "proxy", "backends": ["1.2.3.4:80"],'
                 ' "backends": ["1.2.3.5:80"]}}}',
                 'the rule of "a.com" has the key "backends" twice (keep', id="rule-key-twice"),
    pytest.param('{"version": 3, "hosts": {"a.com": {"action": "proxy", "backends": '
                 '[{"address": "1.2.3.4:80", "weight": 1, "weight": 5}]}}}',
                 'the rule of "a.com" has the key "weight" twice (in "backends"[0])',
                 id="nested-key-twice"),
    pytest.param('{"version": 3, "hosts": {"a.com": {"action": "empty", "\\u0061ction": "x"}}}',
                 'the rule of "a.com" has the key "action" twice', id="escaped-key-twice"),
    pytest.param('{"version": 3, "version": 4, "hosts": {}}',
                 'the key "version" appears twice', id="version-twice"),
])
def test_a_corrupt_file_names_the_path_and_the_reason(tmp_path: Path, content: str,
                                                      reason: str) -> None:
    path = tmp_path / "routes.json"
    store = FileStore(str(path))
    path.write_text(content)
    with pytest.raises(CorruptStore) as caught:
        store.load()
    assert str(path) in str(caught.value)
    assert reason in str(caught.value)


def test_watch_keeps_the_last_good_table_and_reports_a_problem_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "routes.json"
    store = CountingStore(str(path))
    store.put_host("web.example.com", WEB)
    caplog.set_level(logging.ERROR, logger="balancer.store.file")
    with Watcher(store) as watcher:
        watcher.wait_version(1)
        path.write_text("{broken")
        wait_until(lambda: "not valid JSON" in caplog.text, message="the corrupt-file report")
        reads = store.loads
        os.utime(path, ns=(1, 1))  # the watcher reads again: same problem, no new report
        wait_until(lambda: store.loads > reads, message="a second read")
        assert caplog.text.count("not valid JSON") == 1
        assert store.last_error() is not None
        assert watcher.tables[-1] == TableData(1, {"web.example.com": WEB})
        path.write_text(json.dumps({"version": 5, "hosts": {"b.example.com": GONE}}))
        assert watcher.wait_version(5).hosts == {"b.example.com": GONE}
    assert store.last_error() is None
    assert [t.version for t in watcher.tables] == [1, 5]


def test_a_hand_edit_without_a_new_version_is_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    store = FileStore(str(path))
    with Watcher(store) as watcher:
        watcher.wait_version(0)
        path.write_text(json.dumps({"version": 0, "hosts": {"web.example.com": WEB}}))
        wait_until(lambda: watcher.latest().hosts, timeout=1.0, message="the edit")


def test_writing_over_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    store = FileStore(str(path))
    store.put_host("web.example.com", WEB)
    store.load()
    path.write_text("garbage")
    with pytest.raises(CorruptStore):
        store.put_host("b.example.com", GONE)
    assert path.read_text() == "garbage"
    assert store.replace({"b.example.com": GONE}) == 2  # replacing repairs it
    assert store.load() == TableData(2, {"b.example.com": GONE})


def test_a_deleted_file_refuses_one_host_writes_and_a_whole_table_recreates_it(
        tmp_path: Path) -> None:
    """Issue 14.2: a one-host write to a deleted file would leave a one-host table."""
    path = tmp_path / "routes.json"
    store = FileStore(str(path))
    store.put_host("web.example.com", WEB)
    with Watcher(store) as watcher:
        watcher.wait_version(1)
        path.unlink()
        wait_until(lambda: not store.is_reachable(), message="unreachable")
        with pytest.raises(StoreUnavailable, match="cannot read"):
            store.load()
        with pytest.raises(StoreLost, match="balancerctl restore"):
            store.put_host("b.example.com", GONE)
        with pytest.raises(StoreLost):
            store.delete_host("web.example.com")
        assert not path.exists()
        assert store.replace({"b.example.com": GONE}) == 2  # above every version known
        assert watcher.wait_version(2).hosts == {"b.example.com": GONE}
    assert [t.version for t in watcher.tables] == [1, 2]


def test_versions_never_go_back_after_a_repair_or_an_older_file(tmp_path: Path) -> None:
    """Issue 14.3: a repair continues above the highest version known."""
    path = tmp_path / "routes.json"
    store = FileStore(str(path))
    for n in range(5):
        store.put_host(f"h{n}.example.com", GONE)
    path.write_text("garbage")
    assert store.replace({"web.example.com": WEB}) == 6
    path.write_text(json.dumps({"version": 2, "hosts": {}}))  # an older copy put back
    with pytest.raises(StoreLost):
        store.put_host("x.example.com", WEB)
    assert store.replace({"x.example.com": WEB}) == 7
    other = FileStore(str(path))  # another process knowing a higher version elsewhere
    other.raise_floor(40)
    assert other.replace({}) == 41


class CountingStore(FileStore):
    """A file store that counts its reads, so a test can wait for the watcher's next one."""

    loads = 0

    def load(self) -> TableData:
        self.loads += 1
        return super().load()


WRITER = """
import sys
from balancer.stores.file import FileStore
from balancer.stores.snapshot import Snapshot
store = FileStore(sys.argv[1])
for i in range(int(sys.argv[3])):
    store.put_host(f"{sys.argv[2]}-{i}.example.com", {"action": "empty", "status": 204})
"""


def test_two_writer_processes_never_lose_an_update(tmp_path: Path) -> None:
    path = str(tmp_path / "routes.json")
    FileStore(path)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, path, name, "60"], cwd=REPO)
             for name in ("one", "two")]
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    data = FileStore(path).load()
    assert data.version == 120
    assert len(data.hosts) == 120


def test_the_writer_lock_follows_symlinks_to_the_file_they_name_now(tmp_path: Path) -> None:
    first, second = tmp_path / "one" / "routes.json", tmp_path / "two" / "routes.json"
    for real in (first, second):
        real.parent.mkdir()
        FileStore(str(real))
    links = [tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"]
    links[0].symlink_to(first)
    links[1].symlink_to(links[0])  # a link to a link
    links[2].symlink_to(second)
    stores = [FileStore(str(link)) for link in links]
    assert {s.lock_path() for s in stores[:2]} == {f"{first}.lock"}
    assert stores[2].lock_path() == f"{second}.lock"
    links[2].unlink()
    links[2].symlink_to(first)  # retargeted under a running store: its lock follows
    assert stores[2].lock_path() == f"{first}.lock"
    assert [s.put_host(f"h{n}.example.com", WEB) for n, s in enumerate(stores)] == [1, 2, 3]
    assert all(link.is_symlink() for link in links)
    assert not any(p.name.endswith(".lock") for p in tmp_path.iterdir())


@pytest.mark.parametrize("hosts", [
    pytest.param("[" * 100_000 + "]" * 100_000, id="deep"),
    pytest.param('{"a.com": {"action": "static", "status": %s}}' % ("9" * 5000), id="huge"),
])
def test_an_unreadable_snapshot_is_not_used(tmp_path: Path, hosts: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "last-good.json"
    path.write_text('{"store": "file:x", "version": 3, "hosts": ' + hosts + "}")
    with caplog.at_level(logging.WARNING):
        assert Snapshot(str(path), "file:x").load() is None
    assert "not using it" in caplog.text
