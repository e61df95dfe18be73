"""Access log: one line per request, written off the hot path.

The request path only appends a plain tuple (a *record*) to a deque; the
``writer_loop`` greenlet formats and writes pending records every
``flush_interval`` seconds, or sooner once ``batch_size`` records wait. The
write itself runs in gevent's thread pool, so a slow disk or a full stdout
pipe delays the log, never the requests.

Record: a tuple in this field order (build it with ``make_record`` or as a
literal in the same order; text fields take ``str``, ``bytes`` or ``None``)::

    TIME            float, time.time() when the request head arrived
    CLIENT          client IP address
    HOST            Host of the request, as routed
    METHOD, TARGET, PROTOCOL    e.g. "GET", "/a?b=1", "HTTP/1.1"
    STATUS          int status sent to the client
    BYTES_SENT      int bytes sent to the client (head and body)
    BYTES_RECEIVED  int bytes received from the client (head and body)
    REFERER, USER_AGENT         request header values, or None
    REQUEST_ID      the X-Request-Id used
    BACKEND         backend address ("10.0.0.5:9001"), or None if none was used
    DURATION        float seconds from request head to the last byte sent
    BACKEND_TIME    float seconds spent waiting on the backend, or None

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
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from datetime import datetime
from math import modf
from typing import Any, NoReturn

import gevent
import gevent.event
import gevent.lock

(TIME, CLIENT, HOST, METHOD, TARGET, PROTOCOL, STATUS, BYTES_SENT, BYTES_RECEIVED,
 REFERER, USER_AGENT, REQUEST_ID, BACKEND, DURATION, BACKEND_TIME) = range(15)
FIELD_COUNT = 15
FORMATS = ("combined", "json")
STDOUT = "-"
OFF = ""


def make_record(
    started: float, client: str, host: str | bytes, method: str | bytes, target: str | bytes,
    protocol: str | bytes, status: int, bytes_sent: int, bytes_received: int,
    referer: str | bytes | None, user_agent: str | bytes | None, request_id: str | bytes | None,
    backend: str | None, duration: float, backend_time: float | None,
) -> tuple:
    """Build a record tuple in the documented field order."""
    return (started, client, host, method, target, protocol, status, bytes_sent, bytes_received,
            referer, user_agent, request_id, backend, duration, backend_time)


# -- formatting (writer side only) -------------------------------------------
#
# Each format has two formatters that give the same bytes for every record. The
# fast one covers the common case (documented types; every text field already
# printable ASCII that needs no escaping) and returns None for anything else;
# the reference one is the general code with all the escaping, used for what
# the fast one declines. tests/test_accesslog_format.py compares the two.

# -- reference formatters: general, slow ---------------------------------------

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


def _clf_time(stamp: Any) -> str:
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


def _format_combined_escaped(record: Any) -> str:
    """Reference combined line (with its newline) for ``record``: any record, escaping all."""
    brt = record[BACKEND_TIME]
    return (
        f'{_bare(record[HOST])} {_bare(record[CLIENT])} - - [{_clf_time(record[TIME])}] '
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


def _format_json_dumps(record: Any) -> str:
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


# -- fast formatters: the common case, as bytes ---------------------------------
#
# A fast formatter fills a bytes template with the text fields as they are, then
# checks that none needed escaping. Invariant: it returns either None or exactly
# the reference line UTF-8 encoded (then plain ASCII), for every record.

# Bytes that neither format escapes in a quoted field or a JSON string: printable
# ASCII but '"' and '\' (json.dumps with ensure_ascii escapes exactly the rest).
# A bare combined field must not hold a space either.
_PLAIN = bytes(sorted(set(range(0x20, 0x7F)) - {0x22, 0x5C}))
_SPACE = 0x20
_DASH = b"-"
_COMBINED = (b'%s %s - - [%s] "%s %s %s" %d %d "%s" "%s" rid=%s backend=%s rt=%.3f brt=%.3f '
             b"rx=%d\n")
_COMBINED_NO_BRT = _COMBINED.replace(b"brt=%.3f", b"brt=-")
_JSON = (b'{"time":"%s.%03d%s","client":"%s","host":"%s","method":"%s","target":"%s",'
         b'"protocol":"%s","status":%d,"bytes_sent":%d,"bytes_received":%d,"referer":"%s",'
         b'"user_agent":"%s","request_id":"%s","backend":"%s","duration_ms":%s,'
         b'"backend_ms":%s}\n')
# The residue of bytes is what is left once the _PLAIN ones are deleted. A
# template's residue is its own quotes and newline (its % specs are plain, as are
# the times filled in per second and the numbers put in), and residues
# concatenate: so a filled template has the template's residue exactly when
# every text field put in is plain.
_COMBINED_RESIDUE = _COMBINED.translate(None, _PLAIN)  # also _COMBINED_NO_BRT's
_JSON_RESIDUE = _JSON.translate(None, _PLAIN)
# In a JSON line whose text values are plain, ':""' only occurs where a text
# value is empty, which the reference writes as null.
_JSON_EMPTY, _JSON_NULL = b':""', b":null"

# Per second (records share seconds): the templates with the time filled in.
_combined_templates: list = [None, b"", b""]  # [whole second, _COMBINED, _COMBINED_NO_BRT]
_json_template: list = [None, b""]  # [whole second, _JSON]


def _not_text(value: object) -> NoReturn:
    """Decline a text field of an unusual type: the reference formats it or raises."""
    raise TypeError(f"text field of type {type(value).__name__}")


def _text_bytes(values: tuple, missing: bytes) -> list[bytes]:
    """Text fields as bytes, not yet checked plain: `missing` for a falsy value
    (as the reference writes "-" or null), bytes as is, a str UTF-8 encoded
    (then not plain unless ASCII); another type declines (`_not_text`)."""
    return [missing if not value else value if type(value) is bytes
            else value.encode() if type(value) is str else _not_text(value)
            for value in values]


def _exact_fields(record: Any) -> tuple | None:
    """`record` if it is a plain tuple whose counts are exact ints and whose
    duration is a float (so %d and %.3f write them as the reference's :d, :.3f
    and json.dumps do), else None."""
    if type(record) is not tuple:
        return None
    if not (type(record[STATUS]) is type(record[BYTES_SENT]) is type(record[BYTES_RECEIVED])
            is int and type(record[DURATION]) is float):
        return None
    return record


def _fill_combined_time(stamp: float) -> None:
    """Fill ``_combined_templates`` for the second of ``stamp``, with the reference's CLF time."""
    clf = b"[%s]" % _clf_time(stamp).encode()
    _combined_templates[:] = [int(stamp), _COMBINED.replace(b"[%s]", clf, 1),
                              _COMBINED_NO_BRT.replace(b"[%s]", clf, 1)]


def _combined_fast(record: Any) -> bytes | None:
    """``record`` as a combined line if it is the common case, else None."""
    try:
        fields = _exact_fields(record)
        if fields is None:
            return None
        (stamp, client, host, method, target, protocol, status, sent, received,
         referer, agent, rid, backend, duration, brt) = fields
        client, host, method, target, protocol, referer, agent, rid, backend = _text_bytes(
            (client, host, method, target, protocol, referer, agent, rid, backend), _DASH)
        if int(stamp) != _combined_templates[0]:
            _fill_combined_time(stamp)
        if brt is None:
            line = _combined_templates[2] % (
                host, client, method, target, protocol, status, sent, referer, agent, rid,
                backend, duration, received)
        elif type(brt) is float:
            line = _combined_templates[1] % (
                host, client, method, target, protocol, status, sent, referer, agent, rid,
                backend, duration, brt, received)
        else:
            return None
    except Exception:  # not the common case after all: the reference formats it or raises
        return None
    if line.translate(None, _PLAIN) != _COMBINED_RESIDUE:
        return None  # a text field needs escaping
    if _SPACE in host or _SPACE in client or _SPACE in rid or _SPACE in backend:
        return None  # a bare field has a space to escape
    return line


def _fill_json_time(second: float) -> None:
    """Fill ``_json_template`` for ``second``, with the reference's ISO time but the ms."""
    text = datetime.fromtimestamp(second).astimezone().isoformat(timespec="milliseconds")
    if text[19:23] != ".000":  # "YYYY-MM-DDTHH:MM:SS.mmm+HH:MM[:SS]", the year 4 digits
        raise ValueError(f"unexpected ISO time {text!r}")
    iso = b"%s.%%03d%s" % (text[:19].encode(), text[23:].encode())
    _json_template[:] = [second, _JSON.replace(b"%s.%03d%s", iso, 1)]


def _ms_json(seconds: float) -> bytes:
    """``json.dumps(round(seconds * 1000, 3))`` for 0 <= ms < 1e12, without round() and repr().

    round(ms, 3) is the float nearest the digits of ``"%.3f" % ms`` (CPython makes
    both from the same correctly rounded decimal digits), and a float given by at
    most 15 significant digits has those as its shortest repr. So the JSON is
    ``"%.3f" % ms`` without trailing zeros, keeping one digit after the point.
    """
    ms = seconds * 1000
    if not 0.0 <= ms < 1e12:  # also NaN and infinities (json.dumps: NaN, Infinity)
        raise ValueError("duration out of the fast range")
    text = (b"%.3f" % ms).rstrip(b"0")
    return text + b"0" if text[-1] == 0x2E else text  # "12." -> "12.0"


def _json_fast(record: Any) -> bytes | None:
    """``record`` as a JSON line if it is the common case, else None."""
    try:
        fields = _exact_fields(record)
        if fields is None or type(record[TIME]) is not float:
            return None
        (stamp, client, host, method, target, protocol, status, sent, received,
         referer, agent, rid, backend, duration, brt) = fields
        if brt is None:
            backend_ms = b"null"
        elif type(brt) is float:
            backend_ms = _ms_json(brt)
        else:
            return None
        # b"" for a falsy value: turned into null below
        client, host, method, target, protocol, referer, agent, rid, backend = _text_bytes(
            (client, host, method, target, protocol, referer, agent, rid, backend), b"")
        # datetime.fromtimestamp rounds to the microsecond (half to even, as
        # round() does), isoformat then truncates to the millisecond.
        fraction, second = modf(stamp)
        micro = round(fraction * 1e6)
        if not 0 <= micro < 1_000_000:
            return None  # rounds up into the next second, or a negative stamp
        if second != _json_template[0]:
            _fill_json_time(second)
        line = _json_template[1] % (
            micro // 1000, client, host, method, target, protocol, status, sent, received,
            referer, agent, rid, backend, _ms_json(duration), backend_ms)
    except Exception:  # not the common case after all: the reference formats it or raises
        return None
    if line.translate(None, _PLAIN) != _JSON_RESIDUE:
        return None  # a text field needs escaping
    return line.replace(_JSON_EMPTY, _JSON_NULL)


# -- public formatters -----------------------------------------------------------


def format_combined(record: Any) -> str:
    """One extended combined line (with its newline) for ``record``."""
    line = _combined_fast(record)
    return _format_combined_escaped(record) if line is None else line.decode()


def format_json(record: Any) -> str:
    """One JSON line (with its newline) for ``record``."""
    line = _json_fast(record)
    return _format_json_dumps(record) if line is None else line.decode()


FORMATTERS = {"combined": format_combined, "json": format_json}
# For the writer: (fast bytes formatter, reference str formatter) of each format.
_LINE_FORMATTERS = {"combined": (_combined_fast, _format_combined_escaped),
                    "json": (_json_fast, _format_json_dumps)}


# -- the log -------------------------------------------------------------------


class AccessLogError(Exception):
    """The access log cannot be used at all (bad format, cannot open the path)."""


class AccessLog:
    """Buffered access log. ``path``: "" off, "-" stdout, else a file (appended to).

    Call ``start()`` in the worker (opens the path, starts ``writer_loop``),
    ``log(record)`` per request, ``reopen()`` on SIGUSR1 and ``close()`` at exit.
    """

    def __init__(self, path: str, fmt: str = "combined", *,
                 flush_interval: float = 0.2, batch_size: int = 1000) -> None:
        if fmt not in FORMATTERS:
            raise AccessLogError(f"access log format must be one of {', '.join(FORMATS)}, "
                                 f"got {fmt!r}")
        self.path = path
        self.fmt = fmt
        self.is_enabled = path != OFF
        self._format_fast, self._format_reference = _LINE_FORMATTERS[fmt]
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._pending: deque[Any] = deque()  # append/popleft are atomic: no lock needed
        self._wake = gevent.event.Event()
        self._writing = gevent.lock.Semaphore()  # one flush at a time (never on the hot path)
        self._fd: int | None = None
        self._writer: gevent.Greenlet | None = None
        self._reopen_requested = False
        self._is_failing = False
        self._dropped = 0
        self._has_reported_malformed = False
        self._is_closed = not self.is_enabled  # off: `log` does nothing at all

    def log(self, record: Any) -> None:
        """Queue one record. Hot path: an append and a length check, nothing else."""
        if self._is_closed:
            return
        pending = self._pending
        pending.append(record)
        if len(pending) == self._batch_size:
            self._wake.set()

    def start(self) -> None:
        """Open the path and start ``writer_loop``; ``AccessLogError`` if it cannot be opened."""
        if not self.is_enabled or self._writer is not None:
            return
        self._fd = self._open()
        self._writer = gevent.spawn(self.writer_loop)

    def writer_loop(self) -> None:
        """Greenlet body: wake on the interval or a full batch, then ``flush``."""
        while not self._is_closed:
            self._wake.wait(self._flush_interval)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Apply a pending reopen, then format and write every queued record."""
        if self._fd is None:
            return
        with self._writing:
            if self._reopen_requested:
                self._reopen_now()
            batch = [self._pending.popleft() for _ in range(len(self._pending))]
            if batch:
                self._write(self._format_batch(batch))

    def reopen(self) -> None:
        """Ask the writer to reopen the path (logrotate, SIGUSR1); safe from a signal greenlet."""
        self._reopen_requested = True
        self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, stop the writer and close the file; ``log`` becomes a no-op."""
        if self._is_closed:
            return
        self._is_closed = True
        self._wake.set()
        if self._writer is not None:
            self._writer.join(timeout)
            self._writer.kill(block=True, timeout=timeout)
        self.flush()
        fd, self._fd = self._fd, None
        if fd is not None and self.path != STDOUT:
            os.close(fd)

    def __repr__(self) -> str:
        state = "off" if not self.is_enabled else "open" if self._fd is not None else "closed"
        return f"<AccessLog {self.path!r} {self.fmt} {state} pending={len(self._pending)}>"

    def _open(self) -> int:
        if self.path == STDOUT:
            return sys.stdout.fileno()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            return os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise AccessLogError(
                f"cannot open access log {self.path}: {exc.strerror or exc}") from None

    def _reopen_now(self) -> None:
        self._reopen_requested = False
        if self.path == STDOUT:
            return
        try:
            fd = self._open()
        except AccessLogError as exc:
            self._report(f"{exc}; still writing to the old file")
            return
        old, self._fd = self._fd, fd
        if old is not None:
            os.close(old)

    def _format_batch(self, batch: list[Any]) -> bytes:
        format_fast = self._format_fast
        lines: list[bytes] = []
        append = lines.append
        for record in batch:
            line = format_fast(record)
            append(self._format_slowly(record) if line is None else line)
        return b"".join(lines)

    def _format_slowly(self, record: Any) -> bytes:
        """A record the fast formatter declined: the reference line, or b"" if malformed."""
        try:
            return self._format_reference(record).encode("utf-8", "backslashreplace")
        except Exception as exc:  # a caller's bug must not stop the log: tell once
            if not self._has_reported_malformed:
                self._has_reported_malformed = True
                self._report(f"access log: skipping malformed records, first {record!r}: "
                             f"{exc!r}")
            return b""

    def _write(self, data: bytes) -> None:
        try:
            gevent.get_hub().threadpool.apply(_write_all, (self._fd, data))
        except OSError as exc:
            self._dropped += data.count(b"\n")
            if not self._is_failing:
                self._is_failing = True
                self._report(f"access log {self.path}: write failed ({exc.strerror or exc}); "
                             "dropping records until writes succeed again")
            return
        if self._is_failing:
            self._is_failing = False
            self._report(f"access log {self.path}: writing again; "
                         f"{self._dropped} records were dropped")
            self._dropped = 0

    @staticmethod
    def _report(message: str) -> None:
        try:
            sys.stderr.write(f"balancer: {message}\n")
            sys.stderr.flush()
        except (OSError, ValueError):  # stderr gone too: nothing left to tell
            pass


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (os.write may write part of it)."""
    view, written = memoryview(data), 0
    while written < len(data):
        written += os.write(fd, view[written:])
