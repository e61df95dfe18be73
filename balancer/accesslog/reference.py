"""The reference access log formatters: general, any record, all the escaping.

``combined`` format: Apache/nginx combined, led by the virtual host (like
Apache's ``%v``), extended with ``key=value`` fields at the end::

    HOST CLIENT - - [10/Oct/2026:13:55:36 +0200] "METHOD TARGET PROTOCOL" STATUS BYTES_SENT
        "REFERER" "USER_AGENT" rid=REQUEST_ID backend=BACKEND rt=SECONDS brt=SECONDS rx=BYTES

(one line). A missing value is ``-``. Bytes outside printable ASCII, ``"``
and ``\\`` are written as ``\\xHH``, and so is a space in an unquoted field,
so a line always splits unambiguously on spaces and quotes. ``rt`` and
``brt`` are seconds with millisecond precision; ``rx`` is BYTES_RECEIVED.

``json`` format: one JSON object per line with keys ``time`` (ISO 8601, local
time with offset, milliseconds), ``client``, ``host``, ``method``, ``target``,
``protocol``, ``status``, ``bytes_sent``, ``bytes_received``, ``referer``,
``user_agent``, ``request_id``, ``backend``, ``duration_ms``, ``backend_ms``;
a missing value is ``null``.

These define the formats: `balancer.accesslog.fast` gives the same bytes for
the common case, faster, and declines the rest, which these format (or
reject with an exception: a malformed record).
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

from balancer.accesslog.records import (
    BACKEND,
    BACKEND_TIME,
    BYTES_RECEIVED,
    BYTES_SENT,
    CLIENT,
    DURATION,
    HOST,
    METHOD,
    PROTOCOL,
    REFERER,
    REQUEST_ID,
    STATUS,
    TARGET,
    TIME,
    USER_AGENT,
)

_ESCAPE_QUOTED = {i: f"\\x{i:02X}" for i in (*range(0x20), *range(0x7F, 0x100), 0x22, 0x5C)}
_ESCAPE_BARE = {**_ESCAPE_QUOTED, 0x20: "\\x20"}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_stamp_cache: list = [None, ""]  # [whole second, its CLF text]: records share seconds


def _latin1(value: Any) -> str:
    """One char per byte (0..255), so the escape tables cover every char."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if value.isascii():
        return value
    return value.encode("utf-8", "backslashreplace").decode("latin-1")


def _bare(value: Any) -> str:
    return _latin1(value).translate(_ESCAPE_BARE) if value else "-"


def _quoted(value: Any) -> str:
    return _latin1(value).translate(_ESCAPE_QUOTED) if value else "-"


def clf_time(stamp: Any) -> str:
    second = int(stamp)
    if _stamp_cache[0] != second:
        t = time.localtime(second)
        offset = t.tm_gmtoff // 60
        sign = "+" if offset >= 0 else "-"
        _stamp_cache[:] = [second, (
            f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:"
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} "
            f"{sign}{abs(offset) // 60:02d}{abs(offset) % 60:02d}")]
    return _stamp_cache[1]


def combined_line(record: Any) -> str:
    """Reference combined line (with its newline) for ``record``: any record, escaping all."""
    brt = record[BACKEND_TIME]
    return (
        f'{_bare(record[HOST])} {_bare(record[CLIENT])} - - [{clf_time(record[TIME])}] '
        f'"{_quoted(record[METHOD])} {_quoted(record[TARGET])} {_quoted(record[PROTOCOL])}" '
        f'{record[STATUS]:d} {record[BYTES_SENT]:d} '
        f'"{_quoted(record[REFERER])}" "{_quoted(record[USER_AGENT])}" '
        f'rid={_bare(record[REQUEST_ID])} backend={_bare(record[BACKEND])} '
        f'rt={record[DURATION]:.3f} brt={"-" if brt is None else f"{brt:.3f}"} '
        f'rx={record[BYTES_RECEIVED]:d}\n'
    )


def _text(value: Any) -> str | None:
    if not value:
        return None
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def json_line(record: Any) -> str:
    """Reference JSON line (with its newline) for ``record``: any record, via ``json.dumps``."""
    brt = record[BACKEND_TIME]
    stamp = datetime.fromtimestamp(record[TIME]).astimezone()
    return json.dumps({
        "time": stamp.isoformat(timespec="milliseconds"),
        "client": _text(record[CLIENT]), "host": _text(record[HOST]),
        "method": _text(record[METHOD]), "target": _text(record[TARGET]),
        "protocol": _text(record[PROTOCOL]), "status": int(record[STATUS]),
        "bytes_sent": int(record[BYTES_SENT]), "bytes_received": int(record[BYTES_RECEIVED]),
        "referer": _text(record[REFERER]), "user_agent": _text(record[USER_AGENT]),
        "request_id": _text(record[REQUEST_ID]), "backend": _text(record[BACKEND]),
        "duration_ms": round(record[DURATION] * 1000, 3),
        "backend_ms": None if brt is None else round(brt * 1000, 3),
    }, separators=(",", ":")) + "\n"

