"""The fast access-log formatters against the reference ones, over generated records.

Each fast formatter must return exactly the reference line (UTF-8 encoded) or
None; the public formatters and the writer's batches must match the reference
for every record, including the ones the reference rejects.
"""

import json
import random
import time
from decimal import Decimal

import pytest

from balancer.accesslog import AccessLog, fast, format_combined, format_json
from balancer.accesslog import reference as reference_formats
from balancer.accesslog.records import TARGET

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

SEED = 20261010
COUNT = 4000
FORMATS = {
    "combined": (fast.combined_line, reference_formats.combined_line, format_combined),
    "json": (fast.json_line, reference_formats.json_line, format_json),
}
# POSIX TZ strings (no tz database needed): one with an offset in seconds (ISO
# writes +05:30:15, CLF +0530), and one with DST falling back on 2026-11-01 at
# 06:00 UTC.
ZONES = ("UTC0", "<+053015>-5:30:15", "<-0930>9:30", "EST5EDT,M3.2.0,M11.1.0")
DST_END = 1793512800.0
SECOND = 1791640536.0  # 2026-10-10 13:55:36 UTC

PLAIN_TEXTS = ("127.0.0.1", "app.example.com", "GET", "/a?b=1&c=%20", "HTTP/1.1", "-", "x",
               "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0",
               "a1b2c3d4e5f600000001", "10.0.0.5:9001", "[::1]:80", "{}<>|^`~'")
ODD_TEXTS = ("a b", " ", 'say "hi"', "back\\slash", "tab\there", "nl\n", "\x00", "del\x7f",
             "é", "日本", "\U0001F600", "\udc80", "caf\xe9", "\x1b[31m")
ODD_BYTES = (b"\xff", b"\xc3\xa9", b"\x80abc", b"\xed\xa0\x80", b"ok\r\n", b"\x7f")
FRACTIONS = (0.0, 0.25, 0.0004999, 0.0005, 0.0015, 0.9994999, 0.9995, 0.999999,
             0.9999994, 0.9999995, 0.9999996, 0.123456789)
DURATIONS = (0.0, -0.0, 0.0005, 0.0015, 0.0025, 0.00123, 0.0009, 0.0000625, 1e-9, 0.1, 1.0,
             12.3456789, 86400.0, 999999999.9999995, 1e9, 1e10, -0.001, float("inf"),
             float("-inf"), float("nan"))


def text(rng: random.Random, oddness: float):
    """A text field: plain, missing, or (with probability ``oddness``) odd; str or bytes."""
    roll = rng.random()
    if roll < oddness:
        if roll < oddness * 0.2:
            return rng.choice(ODD_BYTES)
        if roll < oddness * 0.4:
            value = "".join(chr(rng.randrange(0, 0x180)) for _ in range(rng.randrange(1, 6)))
        else:
            value = rng.choice(PLAIN_TEXTS) + rng.choice(ODD_TEXTS)
    elif roll < oddness + 0.1:
        return rng.choice((None, "", b""))
    else:
        value = rng.choice(PLAIN_TEXTS)
    return value if rng.random() < 0.5 else value.encode("utf-8", "surrogatepass")


def stamp(rng: random.Random) -> float:
    if rng.random() < 0.2:
        base = DST_END + rng.randrange(-3700, 3700, 100)
    else:
        base = SECOND + rng.randrange(-2, 3) * 86400 * 45 + rng.randrange(3)
    fraction = rng.choice(FRACTIONS) if rng.random() < 0.6 else rng.random()
    return base + fraction


def seconds(rng: random.Random) -> float:
    if rng.random() < 0.4:
        return rng.choice(DURATIONS)
    return rng.expovariate(1 / rng.choice((0.001, 0.05, 3.0)))


def make(rng: random.Random) -> tuple:
    """A record with every kind of field value the writer must survive."""
    oddness = rng.choice((0.0, 0.0, 0.05, 0.2, 0.6))
    record = [stamp(rng), *(text(rng, oddness) for _ in range(5)),
              rng.choice((200, 204, 404, 502, 0, -1, 10**20)),
              rng.randrange(0, 10**7), rng.randrange(0, 10**5),
              *(text(rng, oddness) for _ in range(4)), seconds(rng),
              None if rng.random() < 0.3 else seconds(rng)]
    if rng.random() < 0.01:
        record[0] = rng.choice((-1.5, 0.0, 1e-7, 86399.9999999))
    return tuple(record)


def records(count: int = COUNT, seed: int = SEED) -> list[tuple]:
    rng = random.Random(seed)
    return [make(rng) for _ in range(count)]


def typical(**changes) -> tuple:
    fields = dict(
        started=SECOND + 0.25, client="127.0.0.1", host=b"127.0.0.1:19110", method=b"GET",
        target=b"/index.html", protocol=b"HTTP/1.1", status=200, bytes_sent=4762,
        bytes_received=51, referer=None, user_agent=None, request_id=b"a1b2c3d4e5f600000001",
        backend="127.0.0.1:19101", duration=0.00123, backend_time=0.0009,
    )
    fields.update(changes)
    return tuple(fields.values())  # make_record's order, without its type checks


def reference(fmt: str, record: tuple):
    """The reference line as bytes, or the exception it raises."""
    try:
        return FORMATS[fmt][1](record).encode("utf-8", "backslashreplace")
    except Exception as exc:
        return exc


@pytest.fixture(params=ZONES)
def zone(request, monkeypatch):
    """Run in a time zone, with the time caches empty (they are keyed by second only)."""
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    monkeypatch.setattr(reference_formats, "_stamp_cache", [None, ""])
    monkeypatch.setattr(fast, "_combined_templates", [None, b"", b""])
    monkeypatch.setattr(fast, "_json_template", [None, b""])
    yield request.param
    monkeypatch.undo()
    time.tzset()


def assert_matches(fmt: str, recs: list[tuple]) -> int:
    """Check the fast formatter against the reference; return how many it formatted."""
    fast = FORMATS[fmt][0]
    formatted = 0
    for record in recs:
        line = fast(record)
        if line is not None:
            assert line == reference(fmt, record), record
            formatted += 1
    return formatted


@pytest.mark.parametrize("fmt", FORMATS)
def test_fast_formatter_matches_reference(fmt, zone):
    recs = records()
    formatted = assert_matches(fmt, recs)
    assert COUNT * 0.05 < formatted < COUNT * 0.95  # both paths well exercised


@pytest.mark.parametrize("fmt", FORMATS)
def test_fast_formatter_matches_reference_in_any_order(fmt, zone):
    """Records out of time order, so the per-second caches turn over all the time."""
    recs = records(seed=SEED + 1)
    random.Random(SEED).shuffle(recs)
    assert_matches(fmt, recs)


@pytest.mark.parametrize("fmt", FORMATS)
def test_public_formatter_matches_reference(fmt, zone):
    _, slow, public = FORMATS[fmt]
    for record in records(1500, SEED + 2):
        try:
            expected = slow(record)
        except Exception as exc:
            with pytest.raises(type(exc)):
                public(record)
        else:
            assert public(record) == expected, record


@pytest.mark.parametrize("fmt", FORMATS)
def test_typical_records_take_the_fast_path(fmt, zone):
    fast = FORMATS[fmt][0]
    rng = random.Random(SEED + 3)
    for _ in range(300):
        record = typical(
            started=SECOND + rng.randrange(10) + rng.random(),
            referer=rng.choice((None, b"https://ref.example/p?q=1")),
            user_agent=rng.choice((None, b"curl/8.0", b"Mozilla/5.0 (X11; Linux x86_64)")),
            backend=rng.choice((None, "10.0.0.5:9001")),
            duration=rng.expovariate(100), backend_time=rng.choice((None, rng.random())))
        if rng.random() < 0.5:  # str works as well as bytes
            record = tuple(x.decode() if isinstance(x, bytes) else x for x in record)
        line = fast(record)
        assert line is not None, record
        assert line == reference(fmt, record)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fraction", FRACTIONS)
def test_times_across_second_boundaries(fmt, fraction, zone):
    fast = FORMATS[fmt][0]
    for base in (SECOND - 1, SECOND, SECOND + 1, DST_END - 3600, DST_END - 1, DST_END,
                 DST_END + 1):
        for offset in (0.0, 1e-6, -1e-6, 5e-7, -5e-7):
            record = typical(started=base + fraction + offset)
            line = fast(record)
            assert line is None or line == reference(fmt, record), record


@pytest.mark.parametrize("fmt", FORMATS)
def test_durations_round_as_the_reference(fmt, zone):
    rng = random.Random(SEED + 4)
    values = list(DURATIONS)
    values += [k / 1000 + 0.0005 for k in range(200)]
    values += [k / 16 / 1000 for k in range(200)]  # ms at exact binary ties
    values += [rng.uniform(0, 10 ** rng.randrange(-3, 12)) for _ in range(1000)]
    for value in values:
        for record in (typical(duration=value), typical(backend_time=value),
                       typical(duration=value, backend_time=None)):
            line = FORMATS[fmt][0](record)
            assert line is None or line == reference(fmt, record), record


def test_template_residues():
    """The residue check relies on the templates: the quotes and newline, nothing else."""
    plain = fast._PLAIN
    assert fast._COMBINED_RESIDUE == b'""""""\n'
    assert fast._COMBINED_NO_BRT.translate(None, plain) == fast._COMBINED_RESIDUE
    assert fast._JSON_RESIDUE == b'"' * 50 + b"\n"
    assert bytes(range(256)).translate(None, plain) == bytes(
        [*range(0x20), 0x22, 0x5C, *range(0x7F, 0x100)])


def test_json_milliseconds_as_round_and_repr():
    rng = random.Random(SEED + 5)
    values = [k / 1000 + 0.0005 for k in range(2000)] + [k / 2 ** 14 for k in range(2000)]
    values += [rng.uniform(0, 10 ** rng.randrange(-6, 9)) for _ in range(20000)]
    values += [999999999.9999994, 999999999.9999995, 0.0, -0.0]
    for value in values:
        assert fast._ms_json(value) == json.dumps(round(value * 1000, 3)).encode(), value
    for value in (-0.001, 1e9, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            fast._ms_json(value)


class Text(str):
    def translate(self, table):  # the reference would see this; the fast path must not skip it
        return "translated"


class Data(bytes):
    def decode(self, *args):  # the reference would see this; the fast path must not skip it
        return "decoded"


class Indexed(tuple):
    def __getitem__(self, index):  # the reference indexes, the fast path must not iterate
        return b"indexed" if index == TARGET else super().__getitem__(index)


UNUSUAL = (
    bytearray(b"ba"), bytearray(), memoryview(b"mv"), 0, 5, 1.5, [], ["x"], Text("sub"),
    Text(""), Data(b"data"), Data(b""), True, object(),
)


@pytest.mark.parametrize("fmt", FORMATS)
def test_unusual_values_go_to_the_reference(fmt, zone):
    fast, slow, public = FORMATS[fmt]
    recs = [typical(**{field: value})
            for field in ("client", "host", "target", "referer", "request_id", "backend")
            for value in UNUSUAL]
    recs += [typical(status=200.0), typical(bytes_sent=True), typical(bytes_received="51"),
             typical(duration=1), typical(duration=None), typical(backend_time=1),
             typical(duration=Decimal("0.0025")), typical(backend_time=Decimal("0.0025")),
             typical(started=Decimal(SECOND)), Indexed(typical()),
             typical(started=int(SECOND)), typical(started=None), typical(started="now"),
             typical(started=float("nan")), typical(started=1e300),
             list(typical()), typical() + ("extra",), typical()[:-1], (), ("not", "a"), None]
    for record in recs:
        line = fast(record)
        expected = reference(fmt, record)
        assert line is None or line == expected, record
        if isinstance(expected, Exception):
            with pytest.raises(type(expected)):
                public(record)
        else:
            assert public(record).encode("utf-8", "backslashreplace") == expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_batch_matches_reference_and_skips_malformed(fmt, zone, capsys):
    recs = records(1000, SEED + 6)
    recs[10:10] = [("not", "a", "record"), typical(status="x"), None]
    expected = [reference(fmt, record) for record in recs]
    log = AccessLog("-", fmt)
    assert log._format_batch(recs) == b"".join(
        line for line in expected if not isinstance(line, Exception))
    err = capsys.readouterr().err
    first = next(exc for exc in expected if isinstance(exc, Exception))
    assert err.count("malformed") == 1 and repr(first) in err
