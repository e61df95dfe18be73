"""What a chunked request costs in llhttp parsers (`balancer.http11`): the raw
parser that read a chunked head goes on with the requests after its body when
the whole request came in one read (it then ended the message on the body
parser's byte, between messages), and the body parser goes back to its
callbacks' spares after a body without trailers, so that a client sending
chunked requests one after another makes no parser per request. Through real
sockets: an in-process worker in front of the scripted backend of
tests/test_inline.py; and the parser alone, against a new one."""

from __future__ import annotations

import pytest

from balancer.http11 import END, ProtocolError, RequestCallbacks, RequestParser
from tests import test_inline
from tests.test_inline import ScriptedBackend, connect, response, until

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)
backend = test_inline.backend  # the fixtures: a scripted backend, a worker in front of it
make = test_inline.make

BODY = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"


def chunked(path: bytes, body: bytes = BODY) -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n%s"
            % (path, body))


def test_chunked_requests_one_after_another_make_no_parser(make: test_inline.Make,
                                                           backend: ScriptedBackend) -> None:
    w = make()
    sock = connect(w)
    conns = w.io.connections
    fields = w.contexts[0].request_callbacks.fields
    raw = body = None
    for n in range(4):
        sock.sendall(chunked(b"/c%d" % n))
        status, _, answer = response(sock)
        assert status == 200 and answer.endswith(b" /c%d" % n)
        assert until(lambda: len(conns) == 1)
        parser = next(iter(conns)).parser
        assert fields.spare and parser._hp is not None
        if n:  # the same two llhttp parsers for every request
            assert parser._hp is raw and fields.spare == [body]
        raw, body = parser._hp, fields.spare[0]
    sent = [request for _, request in backend.requests]
    assert [request.partition(b"\r\n\r\n")[2] for request in sent] == [BODY] * 4
    sock.sock.close()


def shape(events: list) -> list:
    return ["END" if e is END else (e.method, e.target, e.trailers) if hasattr(e, "target")
            else bytes(e[0][e[1]:]) if isinstance(e, tuple) else bytes(e) for e in events]


def fresh(data: bytes) -> list:
    """What a new parser makes of `data`: its events, or the status it refused it with."""
    parser = RequestParser()
    try:
        parser.feed(data)
    except ProtocolError as exc:
        return [exc.status]
    return shape(parser.events)


GET = b"GET /next HTTP/1.1\r\nHost: app.test\r\n\r\n"
TRAILERS = b"5\r\nhello\r\n0\r\nConnection: close\r\nX-Sum: 1\r\n\r\n"


@pytest.mark.parametrize(("first", "rest", "raw_kept", "body_kept"), [
    (chunked(b"/a"), b"", True, True),  # whole in one read: both go on
    # a request after it in the read: the raw parser reads on (bug: a new one per
    # pipelined chunked request, the last stopped by an error)
    (chunked(b"/a") + GET, b"", True, True),
    (chunked(b"/a", TRAILERS.replace(b"Connection: close", b"X-A: b")) + GET, b"", True, False),
    (chunked(b"/a", TRAILERS) + GET, b"", False, False),  # llhttp closed: GET not read
    # trailers: a Connection among them leaves llhttp closed (both parsers read them)
    (chunked(b"/a", TRAILERS), b"", False, False),
    (chunked(b"/a", TRAILERS.replace(b"Connection: close", b"X-A: b")), b"", False, False),
    (chunked(b"/a", BODY[:9]), BODY[9:], False, True),  # the body goes on in the next read
])
def test_a_parser_kept_reads_the_next_requests_as_a_new_one(first: bytes, rest: bytes,
                                                            raw_kept: bool,
                                                            body_kept: bool) -> None:
    """After a chunked request (the parsers it may keep), every next request reads as
    it does on a new parser: its events, or the status it is refused with."""
    for data in (GET, chunked(b"/b"), chunked(b"/c", TRAILERS), GET + GET, chunked(b"/d") + GET,
                 b"GET /x HTTP/2.0\r\n\r\n",
                 chunked(b"/e", b"5\r\nhello\r\n0\r\n\r\nGARBAGE"),
                 chunked(b"/f", b"5\r\nhello\r\n0\r\n\r\n") + GET):
        callbacks = RequestCallbacks()
        raw = callbacks.new_parser()
        callbacks.spare.append(raw)  # what the first feed reads the chunked head with
        parser = RequestParser(callbacks=callbacks)
        parser.feed(first)
        if rest:
            parser.feed(rest)
        assert (parser._hp is raw) is raw_kept
        assert (len(callbacks.fields.spare) == 1) is body_kept
        parser.events.clear()
        try:
            parser.feed(data)
            events = shape(parser.events)
        except ProtocolError as exc:
            events = [exc.status]
        assert events == fresh(data), data
