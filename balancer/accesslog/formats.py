"""The access log formats by name: each line from the fast formatter when it
takes the record, else from the reference one (the same bytes either way)."""

from __future__ import annotations

from typing import Any

from balancer.accesslog import fast, reference

FORMATS = ("combined", "json")


def format_combined(record: Any) -> str:
    """One extended combined line (with its newline) for ``record``."""
    line = fast.combined_line(record)
    return reference.combined_line(record) if line is None else line.decode()


def format_json(record: Any) -> str:
    """One JSON line (with its newline) for ``record``."""
    line = fast.json_line(record)
    return reference.json_line(record) if line is None else line.decode()


FORMATTERS = {"combined": format_combined, "json": format_json}
# For the writer: (fast bytes formatter, reference str formatter) of each format.
LINE_FORMATTERS = {"combined": (fast.combined_line, reference.combined_line),
                   "json": (fast.json_line, reference.json_line)}
