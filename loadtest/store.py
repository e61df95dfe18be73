"""results.json: every figure of a run, saved after every row.

Shape::

    {"meta": {...}, "scenarios": {NAME: {"rows": [...], "failures": [...],
                                         "notes": [...]}}}

Invariant: the file on disk is always complete JSON (written to a temp file
and renamed), so an interrupted run keeps everything measured so far.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class Results:
    """The run's results, persisted on every change."""

    def __init__(self, path: Path, meta: dict) -> None:
        self.path = path
        self.data: dict = {"meta": meta, "scenarios": {}}
        self.save()

    def scenario(self, name: str) -> dict:
        return self.data["scenarios"].setdefault(name, {"rows": [], "failures": [],
                                                        "notes": []})

    def add_row(self, scenario: str, row: dict) -> None:
        self.scenario(scenario)["rows"].append(row)
        self.save()

    def add_failure(self, scenario: str, target: str, message: str) -> None:
        self.scenario(scenario)["failures"].append({"target": target, "error": message})
        self.save()

    def add_note(self, scenario: str, note: str) -> None:
        notes = self.scenario(scenario)["notes"]
        if note not in notes:
            notes.append(note)
            self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=False))
        os.replace(tmp, self.path)
