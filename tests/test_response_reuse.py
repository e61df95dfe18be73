"""One response parser per backend connection: `begin` readies it for the next
response, llhttp's parser is given back to its callbacks' spares only when a
response ended cleanly (and taken again by the next read that needs one), the
last head is the backend's (`HeadMemo`), and what the client gets of a
response head does not depend on reuse."""

from __future__ import annotations

import pytest

from balancer.http11 import END, SPARE_PARSERS, ProtocolError
from balancer.response_parser import HeadMemo, ResponseCallbacks, ResponseParser
from balancer.spans import span_bytes

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"


def events_of(parser: ResponseParser) -> list:
    """Statuses of heads, body pieces joined (spans of a read copied out), END."""
    out: list = []
    for event in parser.events:
        if isinstance(event, tuple):
            event = span_bytes(event)
        if isinstance(event, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += event
        else:
            out.append(event.status if hasattr(event, "status") else event)
    return out


def test_responses_one_after_another_on_one_parser() -> None:
    parser = ResponseParser()
    spare = parser._callbacks.spare
    kept = []
    for response, expected in [(OK, [200, b"ok", END]), (CHUNKED, [201, b"abc", END]),
                               (OK, [200, b"ok", END])]:
        parser.begin()
        for i in range(0, len(response), 7):  # split reads
            parser.feed(response[i:i + 7])
            assert (parser._hp is None) == parser.complete  # held while llhttp reads
        assert events_of(parser) == expected and parser.complete
        assert parser.events[0].keep_alive
        kept += spare
    assert len(kept) == 3 and len(set(map(id, kept))) == 1  # clean ends: given back, taken again


def test_begin_clears_what_the_last_response_left() -> None:
    parser = ResponseParser()
    parser.feed(OK)
    parser.begin()
    assert list(parser.events) == [] and not parser.complete
    parser.feed(OK)
    assert events_of(parser) == [200, b"ok", END]


def test_after_a_head_response_a_new_llhttp_parser_is_made() -> None:
    parser = ResponseParser(for_head=True)
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert events_of(parser) == [200, END] and parser.events[0].keep_alive
    parser.begin()  # the next request is a GET: llhttp must expect a body again
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    assert events_of(parser) == [200, b"abc", END]


def test_after_interim_responses_the_parser_is_reusable() -> None:
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
    assert events_of(parser) == [100, END, 200, b"ok", END]
    parser.begin()
    parser.feed(OK)
    assert events_of(parser) == [200, b"ok", END]


@pytest.mark.parametrize("after", [b"HTTP/1.1 200", b"HTTP/1.1 200 OK\r\n", b"H"])
def test_the_start_of_another_response_in_the_same_read_stops_reuse(after: bytes) -> None:
    """Bytes after the final response that llhttp takes as the start of a new
    one (no error yet) would be lost with the connection: it is not reused."""
    parser = ResponseParser()
    parser.feed(OK + after)
    head, body, end = parser.events
    assert (body, end, parser.complete) == (b"ok", END, True)
    assert head.keep_alive is False


def test_a_failed_response_leaves_a_parser_that_begin_renews() -> None:
    parser = ResponseParser()
    with pytest.raises(ProtocolError):
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
    parser.begin()
    parser.feed(OK)
    assert events_of(parser) == [200, b"ok", END]


def test_close_drops_the_llhttp_parser() -> None:
    parser = ResponseParser()
    parser.feed(OK[:20])
    assert parser._hp is not None
    parser.close()
    assert parser._hp is None and not parser._callbacks.spare


NGINX = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 2\r\nConnection: keep-alive, "
         b"X-Secret\r\nX-Secret: s\r\nETag: \"1\"\r\n\r\nok")


def head_fields(head: object) -> tuple:
    return tuple(getattr(head, name) for name in (
        "status", "status_line", "block", "forwarded", "content_length", "chunked",
        "connection_tokens", "announced", "upgrade", "no_body", "keep_alive"))


@pytest.mark.parametrize("second", [
    NGINX,  # the same bytes: read from the last head
    NGINX.replace(b"Content-Length: 2", b"Content-Length: 02"),  # one byte apart: read again
    NGINX.replace(b"200 OK", b"201 Created"),
    NGINX.replace(b"keep-alive, X-Secret", b"close"),
    NGINX.replace(b"\r\n\r\nok", b"\r\nX-More: 1\r\n\r\nok"),  # the last head, then more
    b"\r\n" + NGINX,  # an empty line before the same head
    CHUNKED,
])
def test_a_head_read_after_another_is_what_a_fresh_parser_reads(second: bytes) -> None:
    """The same bytes give the same head (its fields taken from the last one),
    and every other head is read for itself, whatever came before."""
    parser = ResponseParser()
    parser.feed(NGINX)
    first = parser.events[0]
    first.keep_alive = False  # the only field changed after: not carried to the next
    parser.begin()
    parser.feed(second)
    fresh = ResponseParser()
    fresh.feed(second)
    assert head_fields(parser.events[0]) == head_fields(fresh.events[0])
    assert events_of(parser) == events_of(fresh)
    assert parser.events[0].forwarded == fresh.events[0].forwarded
    assert b"X-Secret" not in first.forwarded


def test_a_head_response_after_the_same_bytes_has_no_body() -> None:
    """HEAD and GET answers can be the same bytes: `no_body` is not taken from the last."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
    parser = ResponseParser()
    parser.feed(head + b"ok")
    parser.begin(for_head=True)
    parser.feed(head)
    assert events_of(parser) == [200, END] and parser.events[0].no_body
    parser.begin()
    parser.feed(head + b"ok")
    assert events_of(parser) == [200, b"ok", END] and not parser.events[0].no_body


@pytest.mark.parametrize("response", [
    NGINX,
    NGINX.replace(b"keep-alive, X-Secret", b"close"),
    NGINX.replace(b"HTTP/1.1", b"HTTP/1.0").replace(b"keep-alive, X-Secret", b"X-Secret"),
    NGINX.replace(b"HTTP/1.1", b"HTTP/1.0"),  # 1.0 with keep-alive
    b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\nclose-delimited",
])
def test_a_repeated_head_keeps_what_llhttp_said_of_it(response: bytes) -> None:
    """A head whose bytes repeat the last one's (split over reads or not) has its
    status and keep-alive from the last reading, as a fresh parser reads them."""
    fresh = ResponseParser()
    fresh.feed(response)
    parser = ResponseParser()
    for pieces in ([response], [response[:20], response[20:]]):
        parser.begin()
        for piece in pieces:
            parser.feed(piece)
        if not parser.complete:
            parser.feed_eof()
            fresh.feed_eof()
        assert head_fields(parser.events[0]) == head_fields(fresh.events[0])
        assert events_of(parser) == events_of(fresh)
        parser.events[0].keep_alive = not parser.events[0].keep_alive  # changed after: not kept


class CountedFeeds:
    """llhttp's parser, counting what it was fed."""

    def __init__(self, hp: object) -> None:
        self.hp = hp
        self.fed = 0

    def feed_data(self, data: bytes) -> None:
        self.fed += 1
        self.hp.feed_data(data)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.hp, name)


def read_after(first: bytes, second: list[bytes], for_head: bool = False) -> tuple[list, int]:
    """The events of the reads `second` after the response `first` on one parser,
    and how many of them llhttp was fed; each checked against a fresh parser's
    (all through llhttp), the head's keep-alive included."""
    parser = ResponseParser()
    parser.feed(first)
    callbacks = parser._callbacks
    counted = CountedFeeds(callbacks.take())
    callbacks.spare.append(counted)  # the llhttp parser the next read takes
    parser.begin(for_head)
    fresh = ResponseParser(for_head=for_head)
    for piece in second:
        parser.feed(piece)
        fresh.feed(piece)
        assert events_of(parser) == events_of(fresh)
        assert parser.complete == fresh.complete
    assert head_fields(parser.events[0]) == head_fields(fresh.events[0])
    return events_of(parser), counted.fed


EMPTY = NGINX.replace(b"Content-Length: 2", b"Content-Length: 0")[:-2]


@pytest.mark.parametrize(("first", "second"), [
    (NGINX, [NGINX]),
    (NGINX, [NGINX[:-2], NGINX[-2:]]),  # the head alone, then the body
    (NGINX, [NGINX[:-1], NGINX[-1:]]),  # the body in two reads
    (NGINX, [NGINX[:-1], NGINX[-1:] + b"\r\n"]),  # an empty line after: still reusable
    (NGINX, [NGINX + b"x"]),  # a byte after it: not reusable
    (NGINX, [NGINX[:-1], NGINX[-1:] + b"HTTP/1.1 200"]),
    (EMPTY, [EMPTY]),
    (EMPTY, [EMPTY + b"HTTP/1.1"]),
])
def test_a_repeated_head_and_its_body_are_taken_without_llhttp(first: bytes,
                                                                second: list[bytes]) -> None:
    events, fed = read_after(first, second)
    assert fed == 0 and events[-1] is END


def test_a_body_cut_short_fails_without_llhttp_too() -> None:
    parser = ResponseParser()
    parser.feed(NGINX)
    parser.begin()
    parser.feed(NGINX[:-1])
    with pytest.raises(ProtocolError, match="mid-response"):
        parser.feed_eof()


@pytest.mark.parametrize(("second", "for_head"), [
    ([NGINX[:30], NGINX[30:]], False),  # the head in two reads
    ([b"\r\n" + NGINX], False),  # an empty line first
    ([NGINX[:-2]], True),  # HEAD: no body, whatever the Content-Length
    ([NGINX.replace(b"Content-Length: 2", b"Content-Length: 3") + b"!"], False),
    ([b"HTTP/1.1 100 Continue\r\n\r\n" + NGINX], False),
    ([CHUNKED], False),
])
def test_other_responses_after_a_head_go_through_llhttp(second: list[bytes],
                                                        for_head: bool) -> None:
    _, fed = read_after(NGINX, second, for_head)
    assert fed == len(second)


@pytest.mark.parametrize("response", [
    NGINX.replace(b"200 OK", b"204 No Content").replace(b"Content-Length: 2\r\n", b"")[:-2],
    NGINX.replace(b"200 OK", b"304 Not Modified")[:-2],  # a 304 keeps its Content-Length
    NGINX.replace(b"200 OK", b"304 Not Modified"),  # ...and bytes after it are no body
    NGINX.replace(b"200 OK", b"204 No Content"),  # nor after a 204 that has one
    NGINX.replace(b"keep-alive, X-Secret", b"close"),
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
])
def test_a_repeated_response_llhttp_must_see_goes_through_it(response: bytes) -> None:
    """No body by status, a last response, a chunked body: read by llhttp each time."""
    parser = ResponseParser()
    parser.feed(response)
    for _ in range(2):
        parser.begin()  # (llhttp takes nothing after `Connection: close`: that one is dropped)
        counted = CountedFeeds(parser._callbacks.take())
        parser._hp = counted
        parser.feed(response)
        fresh = ResponseParser()
        fresh.feed(response)
        assert events_of(parser) == events_of(fresh) and parser.complete
        assert counted.fed == 1


def test_llhttp_reads_on_after_a_response_taken_without_it() -> None:
    parser = ResponseParser()
    for response in (NGINX, NGINX, CHUNKED, NGINX, NGINX, OK):
        parser.begin()
        parser.feed(response)
        fresh = ResponseParser()
        fresh.feed(response)
        assert events_of(parser) == events_of(fresh) and parser.complete


# what a pooled connection holds -------------------------------------------------
def test_an_idle_parser_holds_no_head_and_the_backend_s_memo_reads_the_next() -> None:
    """Once its response was relayed (`idle`) a parser holds neither the head nor
    an llhttp parser; the same head is then taken without llhttp all the same."""
    memo = HeadMemo()
    parser = ResponseParser(memo=memo)
    parser.feed(NGINX)
    assert parser.complete and parser._hp is None and memo.last is parser.events[0]
    parser.idle()
    assert parser._head is None
    callbacks = parser._callbacks
    counted = CountedFeeds(callbacks.take())
    callbacks.spare.append(counted)
    parser.begin()
    parser.feed(NGINX)
    fresh = ResponseParser()
    fresh.feed(NGINX)
    assert counted.fed == 0 and events_of(parser) == events_of(fresh)
    assert head_fields(parser.events[0]) == head_fields(fresh.events[0])


@pytest.mark.parametrize("second", [[NGINX], [NGINX[:30], NGINX[30:]], [NGINX[:-1], NGINX[-1:]]])
def test_the_connections_of_one_backend_share_its_last_head(second: list[bytes]) -> None:
    """A head read on one connection is taken from the memo on another (without
    llhttp when it comes whole with its first read, else llhttp reads it and the
    head's fields come from the memo); a parser of another backend reads it."""
    callbacks, memo = ResponseCallbacks(), HeadMemo()
    first = ResponseParser(callbacks=callbacks, memo=memo)
    first.feed(NGINX)
    other = ResponseParser(callbacks=callbacks, memo=memo)
    counted = CountedFeeds(callbacks.take())
    callbacks.spare.append(counted)
    for piece in second:
        other.feed(piece)
    fresh = ResponseParser()
    for piece in second:
        fresh.feed(piece)
    assert events_of(other) == events_of(fresh) and other.complete
    assert head_fields(other.events[0]) == head_fields(fresh.events[0])
    assert other.events[0].block is first.events[0].block  # taken from the memo
    assert counted.fed == (0 if len(second[0]) > len(NGINX) - 2 else len(second))
    elsewhere = ResponseParser(callbacks=callbacks)  # another backend: its own memo
    elsewhere.feed(NGINX)
    assert elsewhere.events[0].block is not first.events[0].block


@pytest.mark.parametrize(("reads", "for_head", "given"), [
    ([OK], False, True),
    ([OK + b"\r\n"], False, True),  # empty lines after: still between messages
    ([OK[:20], OK[20:]], False, True),
    ([CHUNKED], False, True),
    ([CHUNKED.replace(b"0\r\n\r\n", b"0\r\nConnection: close\r\n\r\n")], False, False),
    ([b"HTTP/1.1 100 Continue\r\n\r\n", OK], False, True),
    ([OK.replace(b"OK\r\n", b"OK\r\nConnection: close\r\n")], False, False),  # llhttp closed
    ([OK + b"H"], False, False),  # the start of another response: an error
    ([OK[:-2]], True, False),  # HEAD: llhttp stopped after the head
    ([OK[:20]], False, False),  # not ended yet: held
    ([b"HTTP/1.1 200 OK\r\n\r\nto the end"], False, False),  # ends at EOF
])
def test_llhttp_is_given_back_only_between_messages(reads: list[bytes], for_head: bool,
                                                     given: bool) -> None:
    """llhttp's parser goes back to the spares only after a read that ended a
    keep-alive response without an error; a parser taken from there reads the
    next response as a new one does."""
    callbacks = ResponseCallbacks()
    parser = ResponseParser(for_head=for_head, callbacks=callbacks)
    taken = callbacks.take()
    callbacks.spare.append(taken)
    for data in reads:
        parser.feed(data)
    assert (callbacks.spare == [taken]) is given
    if given:
        assert parser._hp is None
        for response in (CHUNKED, NGINX, OK):
            reader = ResponseParser(callbacks=callbacks)
            reader.feed(response)
            fresh = ResponseParser()
            fresh.feed(response)
            assert events_of(reader) == events_of(fresh) and reader.complete
            assert callbacks.spare == [taken]


def test_the_spare_llhttp_parsers_are_bounded() -> None:
    callbacks = ResponseCallbacks()
    for hp in [callbacks.take() for _ in range(SPARE_PARSERS + 5)]:
        callbacks.give(hp)
    assert len(callbacks.spare) == SPARE_PARSERS
