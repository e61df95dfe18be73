"""A request head sent again byte for byte (issue 21: wrk, health checks, API
polling) is not parsed again: the parser gives the same head object, and the
forwarded head is rewritten once per connection. Every other case takes the
full path and gives what a fresh parser gives; the backend gets the same bytes
either way, but for the request id."""

from __future__ import annotations

import socket

import pytest

from balancer.connection import ClientConnection
from balancer.http11 import (
    END,
    REPEAT_MAX,
    ProtocolError,
    RequestCallbacks,
    RequestHead,
    RequestParser,
)
from balancer.netio import IO
from balancer.server import Worker
from balancer.settings import load_settings
from balancer.spans import span_bytes
from tests.rawpeer import RawBackend, read_until
from tests.support import TableStore

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

GET = b"GET /index.html HTTP/1.1\r\nHost: app.test\r\nUser-Agent: wrk\r\n\r\n"


def fresh(data: bytes) -> list:
    """The events of `data` fed whole to a new parser."""
    parser = RequestParser()
    parser.feed(data)
    return list(parser.events)


# every attribute of a RequestHead (compiled, the class has no __slots__ to read)
ATTRIBUTES = ("method", "target", "version", "block", "marks", "host", "content_length", "chunked",
              "has_body", "keep_alive", "expect_continue", "upgrade", "connection_tokens",
              "trailers", "chunks")


def same(a: RequestHead, b: RequestHead) -> bool:
    return all(getattr(a, name) == getattr(b, name) for name in (*ATTRIBUTES, "headers"))


def test_the_comparison_covers_every_attribute() -> None:
    if hasattr(RequestHead, "__slots__"):  # interpreted
        assert set(RequestHead.__slots__) == set(ATTRIBUTES)


def heads(parser: RequestParser) -> list[RequestHead]:
    return [event for event in parser.events if isinstance(event, RequestHead)]


# the parser ---------------------------------------------------------------------------
def test_the_same_bytes_again_give_the_same_head_and_end() -> None:
    parser = RequestParser()
    for _ in range(3):
        parser.feed(GET)
    events = list(parser.events)
    assert events[1::2] == [END, END, END]
    assert events[0] is events[2] is events[4] is parser.repeat_head
    assert same(events[0], fresh(GET)[0])


@pytest.mark.parametrize("data", [
    GET.replace(b"/index.html", b"/index.htm"),      # one byte less
    GET.replace(b"wrk", b"wrK"),                     # one byte changed
    GET.replace(b"HTTP/1.1", b"HTTP/1.0"),           # not kept alive: the parser closes
    GET + b"\r\n",                                   # an empty line after it
])
def test_other_bytes_take_the_full_path(data: bytes) -> None:
    parser = RequestParser()
    parser.feed(GET)
    parser.feed(data)
    first, second = heads(parser)
    assert second is not first
    assert same(second, fresh(data)[0])


def test_a_head_split_over_two_feeds_is_not_remembered() -> None:
    parser = RequestParser()
    parser.feed(GET[:10])
    parser.feed(GET[10:])
    parser.feed(GET)
    first, second = heads(parser)
    assert second is not first and parser.repeat_head is None
    assert same(second, first)


def test_pipelined_heads_end_the_shortcut() -> None:
    """Two heads in one feed: never remembered, and the parser is not known to be
    between messages at a feed boundary any more (the next head may have begun)."""
    parser = RequestParser()
    parser.feed(GET)
    parser.feed(GET + GET)
    parser.feed(GET)
    found = heads(parser)
    assert len(found) == 4 and found[0] is not found[1] is not found[2] is not found[3]
    assert parser.repeat_head is None


def test_the_start_of_a_next_head_after_one_ends_the_shortcut() -> None:
    parser = RequestParser()
    parser.feed(GET + b"GET /b")
    parser.feed(b" HTTP/1.1\r\nHost: app.test\r\n\r\n")
    parser.feed(GET)
    first, second, third = heads(parser)
    assert second.target == b"/b" and third is not first
    assert parser.repeat_head is None


@pytest.mark.parametrize("data", [
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc",          # a body
    b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",               # closes
    b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: ws\r\n\r\n",  # upgrade
    b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"p" * REPEAT_MAX + b"\r\n\r\n",  # too large
])
def test_heads_that_are_never_remembered(data: bytes) -> None:
    parser = RequestParser()
    parser.feed(data)
    assert parser.repeat_head is None


def test_a_body_after_a_remembered_head_is_parsed_whole() -> None:
    post = b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\n\r\nabc"
    parser = RequestParser()
    parser.feed(GET)
    parser.feed(post)
    parser.feed(GET)
    events = list(parser.events)
    assert events[2].method == b"POST" and span_bytes(events[3]) == b"abc" and events[4] is END
    assert events[5] is not events[0] and same(events[5], events[0])


def test_bad_bytes_after_a_remembered_head_are_refused() -> None:
    parser = RequestParser()
    parser.feed(GET)
    parser.feed(GET)
    with pytest.raises(ProtocolError) as caught:
        parser.feed(GET.replace(b"Host: app.test", b"Host: a b"))
    assert caught.value.status == 400


def test_again_gives_the_head_feed_would_queue_only_with_nothing_queued() -> None:
    """`again` (the hub's `take`, with no list filled and emptied): what `feed`
    would queue, given only when nothing is queued before it (the order)."""
    parser = RequestParser()
    parser.feed(GET)
    first = parser.events[0]
    assert parser.again(GET) is None  # its head and END still queued: `feed` it
    parser.events.clear()
    assert parser.again(GET) is first is parser.repeat_head
    assert parser.events == [] and parser.repeats == 1
    assert parser.again(GET.replace(b"wrk", b"wrK")) is None and parser.repeats == 1
    parser.close()
    assert parser.again(GET) is None


def test_a_closed_parser_gives_nothing_again() -> None:
    parser = RequestParser()
    parser.feed(GET)
    parser.close()
    parser.feed(GET)  # ignored: nothing is queued
    assert len(parser.events) == 2 and parser._hp is None
    parser.events.clear()
    assert parser.again(GET) is None


def shape(events: list) -> list:
    """Heads as their targets, body pieces as bytes, END."""
    return [e if e is END else e.target if isinstance(e, RequestHead) else span_bytes(e)
            for e in events]


POST = b"POST /f HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\n\r\nabc"
CHUNKED = b"POST /c HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"


@pytest.mark.parametrize(("feeds", "given"), [
    ([GET], True),
    ([b"\r\n" + GET], True),  # an empty line before: llhttp skipped it
    ([GET[:20], GET[20:]], False),  # split: not remembered, held
    ([GET + GET], False),  # pipelined
    ([POST], False),  # a body
    ([CHUNKED], False),
    ([GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")], False),
    ([GET.replace(b"\r\n\r\n", b"\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n")], False),
])
def test_llhttp_is_given_back_after_a_whole_bodyless_keep_alive_head(feeds: list[bytes],
                                                                    given: bool) -> None:
    """A parser holds llhttp's parser only while llhttp may be inside a message:
    after a feed that was one whole bodyless keep-alive head it goes back to its
    callbacks' spares; the next feed that needs llhttp takes one, and reads as a
    new parser would."""
    callbacks = RequestCallbacks()
    parser = RequestParser(callbacks=callbacks)
    assert parser._hp is None  # taken by the first feed
    for data in feeds:
        parser.feed(data)
    assert (parser._hp is None) is given and (len(callbacks.spare) == 1) is given
    if given:
        taken = callbacks.spare[0]
        for data in (GET.replace(b"/index", b"/other"), POST, CHUNKED,
                     b"GET /x HTTP/2.0\r\n\r\n"):
            reader = RequestParser(callbacks=callbacks)
            try:
                reader.feed(data)
                events = shape(reader.events)
            except ProtocolError as exc:
                events = [exc.status]
            try:
                expected = shape(fresh(data))
            except ProtocolError as exc:
                expected = [exc.status]
            assert events == expected
            if data.startswith(b"GET /other"):
                assert callbacks.spare == [taken]  # taken, given back again


# through the balancer -----------------------------------------------------------------
def answer_ok(conn: socket.socket, request: bytes) -> bool:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    return True


@pytest.mark.parametrize("internal", [False, True])
def test_the_backend_gets_the_same_head_but_for_the_request_id(proxy_to, internal) -> None:
    backend = RawBackend(answer_ok)
    bal = proxy_to(backend, internal=internal)
    other = GET.replace(b"wrk", b"curl")
    sent = [GET, GET, other, GET, GET]
    port = bal.ports["internal" if internal else "proxy"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        for data in sent:
            conn.sendall(data)
            assert read_until(conn, b"ok").startswith(b"HTTP/1.1 200")
    got = backend.requests
    assert len(got) == len(sent)
    ids = [line for request in got for line in request.split(b"\r\n")
           if line.startswith(b"X-Request-Id: ")]
    assert len(set(ids)) == len(sent)
    unmarked = [request.replace(i, b"X-Request-Id: ?") for request, i in zip(got, ids,
                                                                            strict=True)]
    assert unmarked[0] == unmarked[1] == unmarked[3] == unmarked[4]
    assert unmarked[2] == unmarked[0].replace(b"wrk", b"curl")
    assert b"X-Forwarded-Host: app.test\r\n" in unmarked[0]


def test_a_trusted_clients_request_id_is_kept_in_a_repeated_head(proxy_to) -> None:
    backend = RawBackend(answer_ok)
    bal = proxy_to(backend, internal=True)
    data = GET.replace(b"\r\n\r\n", b"\r\nX-Request-Id: abc123\r\n\r\n")
    with socket.create_connection(("127.0.0.1", bal.ports["internal"]), timeout=10) as conn:
        for _ in range(3):
            conn.sendall(data)
            read_until(conn, b"ok")
    assert [r.count(b"X-Request-Id: abc123\r\n") for r in backend.requests] == [1, 1, 1]


# parked connections ---------------------------------------------------------------------
def test_a_parking_connection_keeps_no_repeated_head_nor_its_rewrite() -> None:
    store = TableStore({"*": {"action": "proxy", "backends": ["127.0.0.1:9"]}})
    worker = Worker(load_settings(flags={}, env={"BALANCER_STORE_SNAPSHOT": "off"}), store,
                    io=IO())
    assert worker.apply(worker.store.load())
    left, right = socket.socketpair()
    with left, right:
        conn = ClientConnection(left, ("127.0.0.1", 1), worker.context("proxy"))
        conn.parser.feed(GET)
        head = conn.read_head(False)
        conn.forwarded = (head, b"before", b"after")
        assert conn.parser.repeat_head is head
        conn.park()  # (the blocking IO cannot park: the memory is given back anyway)
        assert conn.forwarded is None and conn.parser.repeat_head is None
        conn.parser.feed(GET)  # parsed whole, and remembered again
        again = conn.read_head(False)
        assert again is not head and same(again, head) and conn.parser.repeat_head is again
        conn.parser.close()
