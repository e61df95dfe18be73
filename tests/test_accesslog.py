import fcntl
import json
import os
import struct
import termios
import time

import gevent
import pytest

from balancer.accesslog import (
    AccessLog,
    AccessLogError,
    format_combined,
    format_json,
    make_record,
    records,
)
from balancer.accesslog.writer import HELD_BATCH, HELD_LIMIT

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

# 2026-10-10 13:55:36.250 UTC
STAMP = 1791640536.25


def record(**changes):
    fields = dict(
        started=STAMP, client="192.0.2.7", host="app.example.com", method="GET",
        target="/a?b=1", protocol="HTTP/1.1", status=200, bytes_sent=1234, bytes_received=321,
        referer="https://ref.example/", user_agent="curl/8.0", request_id="r-1",
        backend="127.0.0.1:9001", duration=0.0125, backend_time=0.01,
    )
    fields.update(changes)
    return make_record(**fields)


def put(log, rec):
    """Queue `rec` as the request path does, with the bytes of its request it keeps."""
    log.log(rec, records.held_bytes(rec))


@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC0")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        gevent.sleep(0.01)


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def opened():
    logs = []

    def make(*args, **kwargs):
        log = AccessLog(*args, **kwargs)
        logs.append(log)
        return log

    yield make
    for log in logs:
        log.close()


def test_record_field_order():
    rec = record()
    assert len(rec) == records.FIELD_COUNT
    assert rec[records.TIME] == STAMP and rec[records.STATUS] == 200
    assert rec[records.BACKEND] == "127.0.0.1:9001" and rec[records.BACKEND_TIME] == 0.01


def test_combined_line(utc):
    assert format_combined(record()) == (
        'app.example.com 192.0.2.7 - - [10/Oct/2026:13:55:36 +0000] "GET /a?b=1 HTTP/1.1" '
        '200 1234 "https://ref.example/" "curl/8.0" rid=r-1 backend=127.0.0.1:9001 '
        'rt=0.013 brt=0.010 rx=321\n')


def test_combined_time_carries_the_local_offset(monkeypatch):
    monkeypatch.setenv("TZ", "<+0530>-5:30")
    time.tzset()
    try:
        assert "[10/Oct/2026:19:25:37 +0530]" in format_combined(record(started=STAMP + 1))
    finally:
        monkeypatch.undo()
        time.tzset()


def test_combined_missing_values_and_escaping(utc):
    line = format_combined(record(
        host=b"h\xffst", referer=None, user_agent='say "hi" \\ \x01 é',
        request_id="a b", backend=None, backend_time=None, target=b"/p\r\n"))
    assert line.startswith("h\\xFFst ")
    assert '"GET /p\\x0D\\x0A HTTP/1.1"' in line
    assert '"-" "say \\x22hi\\x22 \\x5C \\x01 \\xC3\\xA9"' in line
    assert "rid=a\\x20b backend=- rt=0.013 brt=- rx=321\n" in line
    assert line.count("\n") == 1 and line.isascii()


def test_json_line(utc):
    data = json.loads(format_json(record(referer=None, user_agent=b"ua \xc3\xa9")))
    assert data == {
        "time": "2026-10-10T13:55:36.250+00:00", "client": "192.0.2.7",
        "host": "app.example.com", "method": "GET", "target": "/a?b=1",
        "protocol": "HTTP/1.1", "status": 200, "bytes_sent": 1234, "bytes_received": 321,
        "referer": None, "user_agent": "ua é", "request_id": "r-1",
        "backend": "127.0.0.1:9001", "duration_ms": 12.5, "backend_ms": 10.0,
    }
    no_backend = json.loads(format_json(record(backend=None, backend_time=None)))
    assert no_backend["backend"] is None and no_backend["backend_ms"] is None


def test_writes_combined_to_a_file(tmp_path, opened, utc):
    path = tmp_path / "access.log"
    log = opened(str(path), "combined", flush_interval=0.05)
    log.start()
    put(log, record())
    put(log, record(status=404))
    wait_for(lambda: len(lines(path)) == 2)
    assert lines(path)[0] == format_combined(record()).rstrip("\n")
    assert ' 404 ' in lines(path)[1]


def test_writes_json_lines_to_a_file(tmp_path, opened):
    path = tmp_path / "access.json"
    log = opened(str(path), "json", flush_interval=0.05)
    log.start()
    for status in (200, 502):
        put(log, record(status=status))
    wait_for(lambda: len(lines(path)) == 2)
    assert [json.loads(line)["status"] for line in lines(path)] == [200, 502]


def test_appends_to_an_existing_file(tmp_path, opened):
    path = tmp_path / "access.log"
    path.write_text("old line\n")
    log = opened(str(path), "json")
    log.start()
    put(log, record())
    log.flush()
    assert lines(path)[0] == "old line" and len(lines(path)) == 2


def test_full_batch_wakes_the_writer_early(tmp_path, opened):
    path = tmp_path / "access.log"
    log = opened(str(path), "json", flush_interval=60, batch_size=5)
    log.start()
    for _ in range(4):
        put(log, record())
    for _ in range(3):  # a woken writer runs in the loop's callbacks, before these return
        gevent.sleep(0)
    # below the batch size: waits for the interval (woken, it would have taken the batch)
    assert "pending=4" in repr(log) and lines(path) == []
    put(log, record())
    wait_for(lambda: len(lines(path)) == 5, timeout=3)


def test_reopen_after_rename(tmp_path, opened):
    path = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    log = opened(str(path), "json", flush_interval=0.05)
    log.start()
    put(log, record(status=201))
    wait_for(lambda: len(lines(path)) == 1)
    os.rename(path, rotated)
    put(log, record(status=202))
    wait_for(lambda: len(lines(rotated)) == 2)  # still the old file until reopen
    log.reopen()
    put(log, record(status=203))
    wait_for(lambda: len(lines(path)) == 1)
    assert json.loads(lines(path)[0])["status"] == 203
    assert [json.loads(x)["status"] for x in lines(rotated)] == [201, 202]


def test_reopen_applies_on_explicit_flush(tmp_path, opened):
    path = tmp_path / "access.log"
    log = opened(str(path), "json", flush_interval=60)
    log.start()
    os.rename(path, tmp_path / "old.log")
    log.reopen()
    put(log, record())
    log.flush()
    assert len(lines(path)) == 1


def test_reopen_failure_keeps_the_old_file(tmp_path, opened, capsys):
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir()
    path = logs_dir / "access.log"
    log = opened(str(path), "json", flush_interval=60)
    log.start()
    kept = tmp_path / "kept.log"
    os.rename(path, kept)
    logs_dir.rmdir()
    log.reopen()
    put(log, record())
    log.flush()
    assert "cannot open access log" in capsys.readouterr().err
    assert len(lines(kept)) == 1


def test_off_writes_nothing(tmp_path, opened):
    log = opened("", "combined", flush_interval=0.01)
    assert not log.is_enabled
    log.start()
    put(log, record())
    log.flush()
    log.reopen()
    assert "pending=0" in repr(log)
    log.close()  # joins a writer, if one was started, after its last write
    assert list(tmp_path.iterdir()) == []


def test_stdout(opened, capfd):
    log = opened("-", "json")
    log.start()
    put(log, record(status=418))
    log.close()
    out = capfd.readouterr().out.splitlines()
    assert [json.loads(x)["status"] for x in out] == [418]


def test_close_flushes_and_stops(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path), "json", flush_interval=60)
    log.start()
    put(log, record())
    log.close()
    assert len(lines(path)) == 1
    put(log, record())
    log.flush()
    log.close()
    assert len(lines(path)) == 1 and "closed" in repr(log)


def test_cannot_open_is_a_clear_error(tmp_path):
    missing = tmp_path / "no" / "access.log"
    log = AccessLog(str(missing), "combined")
    with pytest.raises(AccessLogError, match=f"cannot open access log {missing}: "):
        log.start()


def test_bad_format_is_an_error():
    with pytest.raises(AccessLogError, match="must be one of combined, json, got 'xml'"):
        AccessLog("-", "xml")


def test_write_failure_reported_once_then_recovery(tmp_path, opened, capsys):
    link = tmp_path / "access.log"
    os.symlink("/dev/full", link)  # every write fails with ENOSPC
    log = opened(str(link), "json", flush_interval=60)
    log.start()
    for _ in range(3):
        put(log, record())
        log.flush()
    err = capsys.readouterr().err
    assert err.count("write failed") == 1 and str(link) in err
    os.remove(link)
    log.reopen()
    put(log, record())
    log.flush()
    assert "writing again; 3 records were dropped" in capsys.readouterr().err
    assert len(lines(link)) == 1


def test_malformed_record_is_skipped_and_reported_once(tmp_path, opened, capsys):
    path = tmp_path / "access.log"
    log = opened(str(path), "combined", flush_interval=60)
    log.start()
    log.log(("not", "a", "record"), 0)
    put(log, record())
    log.log(("again",), 0)
    log.flush()
    assert capsys.readouterr().err.count("malformed") == 1
    assert len(lines(path)) == 1


def test_close_leaves_a_write_that_blocks_to_its_thread(tmp_path):
    """A FIFO whose reader never reads: the write of a record bigger than the pipe
    blocks for ever. Bug: `close` wrote what was queued meanwhile behind it, and
    a stopping worker waited until the arbiter killed it."""
    fifo = tmp_path / "access.log"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    log = AccessLog(str(fifo), "json", flush_interval=60)
    try:
        log.start()
        put(log, record(user_agent="u" * (1 << 17)))
        gevent.spawn(log.flush)
        capacity = fcntl.fcntl(reader, F_GETPIPE_SZ)
        wait_for(lambda: unread(reader) == capacity)  # full: the write blocks
        put(log, record())
        closing = gevent.spawn(log.close, 0.2)
        closing.join(3)
        assert closing.dead
    finally:
        os.close(reader)  # the blocked write fails (EPIPE): its thread ends


F_GETPIPE_SZ = 1032  # Linux's fcntl: a pipe's capacity


def unread(fd):
    """Bytes waiting in pipe `fd`."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def test_big_records_wake_the_writer_before_the_bytes_bound(tmp_path):
    """Records of heads near the 64 KiB limit: past HELD_BATCH bytes the writer is
    woken as at a full batch, long before HELD_LIMIT (a fast client's records, a
    flush only every 0.2 s, reached it between two flushes and were dropped)."""
    path = tmp_path / "access.log"
    log = AccessLog(str(path), "combined", flush_interval=60)  # only a wake writes
    try:
        log.start()
        count = HELD_BATCH // 60_000 + 1
        for _ in range(count):
            put(log, record(user_agent="u" * 60_000))
        wait_for(lambda: len(lines(path)) == count)
        assert log.dropped_total == 0 and count * 60_000 < HELD_LIMIT
    finally:
        log.close()
