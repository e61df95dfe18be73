"""The management process's round trips to its workers per write
(`management.cluster.ClusterRuntime`), against scripted worker control sockets."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from balancer.control import control_path
from management.cluster import ClusterRuntime


class ScriptedWorker:
    """A unix socket answering control commands as a worker at `highest` would,
    recording every command it gets."""

    def __init__(self, directory: Path, pid: int, highest: int) -> None:
        self.pid, self.highest, self.commands = pid, highest, []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(control_path(str(directory), pid))
        self.listener.listen(8)
        self.listener.settimeout(10)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        for _ in range(100):  # bounded: more commands than any test sends
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with sock:
                command = sock.makefile("rb").readline().decode().strip()
                self.commands.append(command.split()[0])
                if command.startswith("apply "):
                    self.highest = max(self.highest, json.loads(command[6:])["version"])
                sock.sendall(json.dumps({"pid": self.pid, "version": self.highest,
                                         "highest": self.highest}).encode())

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[ScriptedWorker]]:
    started = [ScriptedWorker(tmp_path, 101, 7), ScriptedWorker(tmp_path, 102, 12)]
    yield started
    for worker in started:
        worker.close()


def test_workers_are_asked_their_highest_version_once_not_per_write(
        tmp_path: Path, workers: list[ScriptedWorker]) -> None:
    runtime = ClusterRuntime(str(tmp_path), store=None, workers=2)
    assert runtime.highest_version() == 12
    assert runtime.publish(13, {"a.test": None}) == []
    assert runtime.highest_version() == 13  # from the apply answers: no new question
    assert [w.commands for w in workers] == [["version", "apply"], ["version", "apply"]]
    workers.append(ScriptedWorker(tmp_path, 103, 40))  # a new worker (its snapshot) is asked
    assert runtime.highest_version() == 40
    assert workers[2].commands == ["version"]
    assert workers[0].commands == ["version", "apply", "version"]
