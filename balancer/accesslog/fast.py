"""The fast access log formatters: the common case, as bytes.

Each format has two formatters that give the same bytes for every record: the
reference one (`balancer.accesslog.reference`) is the general code with all
the escaping; the fast one here covers the common case (documented types;
every text field already printable ASCII that needs no escaping) and returns
None for anything else. tests/test_accesslog_format.py compares the two.

A fast formatter fills a bytes template with the text fields as they are, then
checks that none needed escaping.

Invariant: a fast formatter returns either None or exactly the reference line
UTF-8 encoded (then plain ASCII), for every record.
"""

from __future__ import annotations

from datetime import datetime
from math import modf
from typing import Any, NoReturn

from balancer.accesslog.records import (
    BYTES_RECEIVED,
    BYTES_SENT,
    DURATION,
    STATUS,
    TIME,
)
from balancer.accesslog.reference import clf_time

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
    clf = b"[%s]" % clf_time(stamp).encode()
    _combined_templates[:] = [int(stamp), _COMBINED.replace(b"[%s]", clf, 1),
                              _COMBINED_NO_BRT.replace(b"[%s]", clf, 1)]


def combined_line(record: Any) -> bytes | None:
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


def json_line(record: Any) -> bytes | None:
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

