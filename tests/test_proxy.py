"""The core data plane through real sockets: routing, keep-alive, bodies, headers, errors."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests.support import (
    Backend,
    Balancer,
    dead_address,
    raw_exchange,
    request,
    split_responses,
    wait_for,
)

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)


@pytest.fixture(scope="module")
def backends():
    started = [Backend("a"), Backend("b"), Backend("c")]
    yield started
    for backend in started:
        backend.stop()


def hosts_of(backends):
    a, b, c = backends
    return {
        "app.test": {"action": "proxy", "backends": [a.address]},
        "other.test": {"action": "proxy", "backends": [b.address]},
        "*.wild.test": {"action": "proxy", "backends": [c.address]},
        "sub.test": {"action": "static", "body": "parent", "subdomains": True},
        "deep.sub.test": {"action": "static", "body": "exact"},
        "static.test": {"action": "static", "status": 201, "body": "hello",
                        "content_type": "text/plain"},
        "page.test": {"action": "static", "page": "maintenance"},
        "go.test": {"action": "redirect", "to": "https://example.com/", "status": 301,
                    "keep_path": True},
        "empty.test": {"action": "empty", "status": 403},
        "dead.test": {"action": "proxy", "backends": [dead_address()]},
        "limited.test": {"action": "proxy", "backends": [a.address], "max_body_bytes": 10},
    }


@pytest.fixture(scope="module")
def balancer(tmp_path_factory, backends):
    """One balancer for the module's tests that only send it requests (a test that
    changes its table starts its own)."""
    tmp = tmp_path_factory.mktemp("proxy")
    bal = Balancer(tmp, hosts_of(backends), internal=True,
                   args=["--access-log", str(tmp / "access.log")])
    yield bal
    bal.stop()


def body_of(response):
    return json.loads(response[2])


def test_routing_precedence(balancer, backends):
    a, b, c = backends
    assert body_of(request(balancer.port, host="app.test"))["backend"] == "a"
    assert body_of(request(balancer.port, host="APP.Test:8080"))["backend"] == "a"
    assert body_of(request(balancer.port, host="x.y.wild.test"))["backend"] == "c"
    assert request(balancer.port, host="deep.sub.test")[2] == b"exact"
    assert request(balancer.port, host="other.deep.sub.test")[2] == b"parent"
    assert request(balancer.port, host="sub.test")[2] == b"parent"
    status, _, body = request(balancer.port, host="nowhere.test")
    assert status == 404 and b"<html" in body


def test_catch_all_and_empty_table(tmp_path, backends):
    bal = Balancer(tmp_path, {"*": {"action": "proxy", "backends": [backends[1].address]}})
    try:
        assert body_of(request(bal.port, host="anything.test"))["backend"] == "b"
        bal.write_routes({})
        wait_for(lambda: request(bal.port, host="anything.test")[0] == 503,
                 what="no-hosts page after emptying the table")
        status, headers, body = request(bal.port, host="anything.test")
        assert int(headers["content-length"]) == len(body)
    finally:
        bal.stop()


def test_local_actions(balancer):
    status, headers, body = request(balancer.port, host="static.test")
    assert (status, body, headers["content-type"]) == (201, b"hello", "text/plain")
    status, headers, body = request(balancer.port, host="page.test")
    assert status == 503 and int(headers["content-length"]) == len(body) > 0
    status, headers, _ = request(balancer.port, host="go.test", path="/a/b?c=1")
    assert status == 301 and headers["location"] == "https://example.com/a/b?c=1"
    status, headers, body = request(balancer.port, host="empty.test")
    assert (status, body, headers["content-length"]) == (403, b"", "0")
    status, headers, body = request(balancer.port, "HEAD", host="static.test")
    assert status == 201 and body == b"" and headers["content-length"] == "5"


def test_keepalive_routes_each_request(balancer):
    sock = socket.create_connection(("127.0.0.1", balancer.port), timeout=5)
    try:
        seen = []
        for host in ("app.test", "other.test", "app.test"):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
            data = b""
            while b"\r\n\r\n" not in data or len(split_responses_safe(data)) < 1:
                data += sock.recv(65536)
            seen.append(json.loads(split_responses(data)[0][2])["backend"])
        assert seen == ["a", "b", "a"]
    finally:
        sock.close()


def split_responses_safe(data):
    try:
        parts = split_responses(data)
    except (ValueError, IndexError):
        return []
    return [p for p in parts if len(p[2]) == int(p[1].get("content-length", 0))]


def test_pipelined_requests_answered_in_order(balancer):
    pipeline = b"".join(
        b"GET /%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (i, host)
        for i, host in enumerate([b"app.test", b"other.test", b"static.test", b"app.test"]))
    pipeline += b"GET /last HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
    responses = split_responses(raw_exchange(balancer.port, pipeline))
    assert [r[0] for r in responses] == [200, 200, 201, 200, 200]
    assert json.loads(responses[0][2])["path"] == "/0"
    assert json.loads(responses[1][2])["backend"] == "b"
    assert responses[2][2] == b"hello"
    assert json.loads(responses[3][2])["path"] == "/3"
    assert json.loads(responses[4][2])["path"] == "/last"


def test_a_deep_pipeline_read_slowly_is_answered_whole_and_in_order(tmp_path, backends):
    """Responses back up behind a client that reads little at a time: held
    writes the socket takes only in part (balancer.outbox) must still leave
    whole and in order, and the connection must go on."""
    big = "x" * 20000  # a few responses fill the socket buffers
    bal = Balancer(tmp_path, {"big.test": {"action": "static", "body": big},
                              "app.test": {"action": "proxy", "backends": [backends[0].address]}})
    count = 400
    pipeline = b"".join(
        b"GET /%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (i, b"big.test" if i % 50 else b"app.test")
        for i in range(count))
    pipeline += b"GET /last HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
    sock.settimeout(10)
    try:
        sock.connect(("127.0.0.1", bal.port))
        sender = threading.Thread(target=sock.sendall, args=(pipeline,), daemon=True)
        sender.start()
        chunks, deadline = [], time.monotonic() + 30
        while time.monotonic() < deadline:
            chunk = sock.recv(2048)  # a slow reader: small reads
            if not chunk:
                break
            chunks.append(chunk)
        sender.join(5)
    finally:
        sock.close()
        bal.stop()
    responses = split_responses(b"".join(chunks))
    assert len(responses) == count + 1
    for i, (status, _, body) in enumerate(responses[:count]):
        if i % 50:
            assert (status, body) == (200, big.encode()), i
        else:
            assert status == 200 and json.loads(body)["path"] == f"/{i}", i
    assert json.loads(responses[-1][2])["path"] == "/last"


def test_forwarded_headers_external(balancer):
    echoed = body_of(request(balancer.port, host="app.test", headers={
        "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https", "Forwarded": "for=x",
        "X-Request-Id": "client-chosen", "Connection": "X-Secret", "X-Secret": "hop",
        "Keep-Alive": "timeout=5"}))
    headers = {k.lower(): v for k, v in echoed["headers"].items()}
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "app.test"
    assert "forwarded" not in headers and "x-secret" not in headers
    assert "keep-alive" not in headers
    assert headers["x-request-id"] != "client-chosen" and len(headers["x-request-id"]) >= 16


def test_forwarded_headers_internal(balancer):
    status, response_headers, body = request(balancer.ports["internal"], host="app.test",
                                             headers={"X-Forwarded-For": "6.6.6.6",
                                                      "X-Forwarded-Proto": "https",
                                                      "X-Request-Id": "trace-1"})
    headers = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
    assert headers["x-forwarded-for"] == "6.6.6.6, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-request-id"] == "trace-1"
    assert response_headers["x-request-id"] == "trace-1"


def test_request_id_echoed(balancer):
    status, headers, body = request(balancer.port, host="app.test")
    sent = {k.lower(): v for k, v in json.loads(body)["headers"].items()}["x-request-id"]
    assert headers["x-request-id"] == sent


def test_upload_and_download_stream(balancer):
    payload = b"0123456789" * 100_000
    status, _, body = request(balancer.port, "POST", "/up", host="app.test", body=payload)
    echoed = json.loads(body)
    assert status == 200 and echoed["body_len"] == len(payload)
    status, headers, body = request(balancer.port, path="/big?n=3000000", host="app.test")
    assert status == 200 and len(body) == 3_000_000


def test_chunked_and_close_delimited_responses(balancer):
    status, headers, body = request(balancer.port, path="/chunked?pieces=4", host="app.test")
    assert status == 200 and body == b"piece0;piece1;piece2;piece3;"
    assert headers.get("transfer-encoding") == "chunked"
    status, headers, body = request(balancer.port, path="/eof", host="app.test")
    assert status == 200 and body == b"until-close"
    raw = raw_exchange(balancer.port, b"GET /eof HTTP/1.0\r\nHost: app.test\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"until-close")
    assert b"transfer-encoding" not in raw.lower()


def test_chunked_upload(balancer):
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    raw = raw_exchange(balancer.port, b"POST /c HTTP/1.1\r\nHost: app.test\r\n"
                       b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body)
    status, headers, data = split_responses(raw)[0]
    assert status == 200 and json.loads(data)["body_len"] == 11


def test_expect_continue(balancer):
    sock = socket.create_connection(("127.0.0.1", balancer.port), timeout=5)
    try:
        sock.sendall(b"PUT /e HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        interim = sock.recv(1024)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"hello")
        data = b""
        while not split_responses_safe(data):
            data += sock.recv(65536)
        assert json.loads(split_responses(data)[0][2])["body_len"] == 5
    finally:
        sock.close()


def test_head_204_304(balancer):
    status, headers, body = request(balancer.port, "HEAD", "/x", host="app.test")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    assert request(balancer.port, path="/status/204", host="app.test")[0] == 204
    assert request(balancer.port, path="/status/304", host="app.test")[0] == 304
    assert request(balancer.port, path="/status/500", host="app.test")[0] == 500


def test_max_body_bytes(balancer):
    status, _, _ = request(balancer.port, "POST", host="limited.test", body=b"x" * 11)
    assert status == 413
    assert request(balancer.port, "POST", host="limited.test", body=b"x" * 10)[0] == 200


def test_dead_backend_is_bad_gateway(balancer):
    status, headers, body = request(balancer.port, host="dead.test")
    assert status == 502 and int(headers["content-length"]) == len(body)


def test_backend_drop_is_bad_gateway(balancer):
    assert request(balancer.port, "POST", "/drop", host="app.test", body=b"x")[0] == 502


def test_backend_read_timeout(tmp_path, backends):
    hosts = {"app.test": {"action": "proxy", "backends": [backends[0].address], "retries": 0}}
    bal = Balancer(tmp_path, hosts, env={"BALANCER_TIMEOUTS_BACKEND_READ": "0.5"})
    try:
        started = time.monotonic()
        status, _, _ = request(bal.port, path="/slow?s=3", host="app.test")
        assert status == 504 and time.monotonic() - started < 2.5
    finally:
        bal.stop()


def test_client_header_timeout_slowloris(tmp_path):
    bal = Balancer(tmp_path, {}, env={"BALANCER_TIMEOUTS_CLIENT_HEADER": "0.5"})
    try:
        sock = socket.create_connection(("127.0.0.1", bal.port), timeout=5)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")
        started = time.monotonic()
        data = sock.recv(65536)
        assert data.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 3
        sock.close()
    finally:
        bal.stop()


def test_client_idle_timeout(tmp_path):
    bal = Balancer(tmp_path, {}, env={"BALANCER_TIMEOUTS_CLIENT_IDLE": "0.5"})
    try:
        sock = socket.create_connection(("127.0.0.1", bal.port), timeout=5)
        started = time.monotonic()
        assert sock.recv(1) == b"" and time.monotonic() - started < 3
        sock.close()
    finally:
        bal.stop()


@pytest.mark.parametrize("raw,status", [
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
     400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
])
def test_malformed_requests_rejected(balancer, backends, raw, status):
    before = sum(b.count for b in backends)
    response = raw_exchange(balancer.port, raw)
    assert response.startswith(b"HTTP/1.1 %d" % status), response[:80]
    assert b"connection: close" in response.lower()
    assert sum(b.count for b in backends) == before


def test_access_log_written(balancer):
    request(balancer.port, host="app.test", path="/logged")
    path = balancer.tmp / "access.log"
    line = wait_for(lambda: [ln for ln in path.read_text().splitlines() if "/logged" in ln],
                    what="access log line")[0]
    assert "app.test" in line and " 200 " in line


def test_bad_rules_in_file_keep_last_table(tmp_path, backends):
    balancer = Balancer(tmp_path, hosts_of(backends))  # (its own: the table changes)
    try:
        balancer.write_routes({"app.test": {"action": "proxy", "backends": []}}, version=50)
        wait_for(lambda: "backends: must be a non-empty list" in balancer.output(),
                 what="the invalid table to be reported")
        assert body_of(request(balancer.port, host="app.test"))["backend"] == "a"
        balancer.routes.write_text("{not json")
        wait_for(lambda: "not valid JSON" in balancer.output(), what="corrupt file reported")
        assert body_of(request(balancer.port, host="app.test"))["backend"] == "a"
        balancer.write_routes({"app.test": {"action": "static", "body": "new"}}, version=60)
        wait_for(lambda: request(balancer.port, host="app.test")[2] == b"new",
                 what="a good edit to be picked up")
    finally:
        balancer.stop()
