"""Hostile probes of the dashboard and the diagnosis API (SPEC §11): client
addresses and paths carrying HTML from the data plane, pages on another origin,
a table of 20,000 hosts, and garbage query parameters to top, inflight and
history. Real balancers and real sockets; the page in a real headless Chromium.
"""

from __future__ import annotations

import http.client
import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import test_dashboard
from tests.support import Backend, Balancer, in_threads, raw_exchange, split_responses
from tests.support import wait_for as wait_until
from tests.test_dashboard import SLOW, Site, host_card, open_live, severe_logs, text_of, wait_for

# the dashboard tests' fixtures: a management app over a scripted runtime, and Chromium
chromium, browser, make_site = (test_dashboard.chromium, test_dashboard.browser,
                                test_dashboard.make_site)

XSS_CLIENT = '<img src=x onerror="window.__xss=1">'
XSS_PATH = "/<svg/onload=window.__xss=2>"
PATH_KEY = "*/<svg"  # the rule key and the path's first segment


def get(port: int, path: str, headers: dict[str, str] | None = None,
        method: str = "GET", body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


@pytest.fixture
def backend() -> Iterator[Backend]:
    started = Backend("a")
    yield started
    started.stop()


@pytest.fixture
def lb(tmp_path: Path, backend: Backend) -> Iterator[Balancer]:
    balancer = Balancer(tmp_path, {"*": {"action": "proxy", "backends": [backend.address]}},
                        internal=True)
    yield balancer
    balancer.stop()


def hostile_traffic(lb: Balancer, count: int = 5) -> None:
    """Requests on the trusted listener whose client (X-Forwarded-For) and path
    are markup, as a front proxy would pass them on. An X-Forwarded-For entry
    that is no IP address names no client (the peer counts, docs/rules.md): the
    markup reaches the tops only as a path."""
    raw = (f"GET {XSS_PATH} HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: {XSS_CLIENT}\r\n"
           f"Connection: close\r\n\r\n").encode()
    for _ in range(count):
        data = raw_exchange(lb.ports["internal"], raw)
        assert split_responses(data)[0][0] == 200, data[:200]


def embedded_state(page: str) -> str:
    return page.split('<script id="initial-state" type="application/json">')[1].split(
        "</script>")[0]


# 1. markup from the data plane -----------------------------------------------------------
def test_markup_in_clients_and_paths_is_json_in_the_api_and_inert_in_the_page(
        lb: Balancer) -> None:
    hostile_traffic(lb)
    status, headers, body = get(lb.mport, "/api/v1/top?group=client")
    assert status == 200 and headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff"
    assert json.loads(body)["top"][0]["key"] == "127.0.0.1"  # the peer, not the markup
    paths = json.loads(get(lb.mport, "/api/v1/top?group=path")[2])["top"]
    assert paths[0]["key"] == PATH_KEY
    status, headers, page = get(lb.mport, "/")
    assert status == 200 and headers["x-frame-options"] == "DENY"
    embedded = embedded_state(page.decode())
    assert "<" not in embedded and ">" not in embedded
    tops = json.loads(embedded)["heavy"]["tops"]
    assert tops["client"]["top"][0]["key"] == "127.0.0.1"
    assert tops["path"]["top"][0]["key"] == PATH_KEY


def test_markup_in_every_heavy_field_is_drawn_as_text_in_chromium(
        make_site: Callable[..., Site], browser: Any) -> None:
    """What the workers answer (scripted here: the test above has the real data
    plane carry it) drawn by the page, first from the embedded state, then from a
    poll: every field shows the markup as text and runs nothing."""
    site = make_site(hosts={"app.example.com": {"action": "empty", "status": 204}})
    site.runtime.top = {("requests", "client"): {XSS_CLIENT: [5, 0]},
                        ("requests", "path"): {PATH_KEY: [5, 0]},
                        ("requests", "backend"): {"<b>backend</b>": [5, 0]}}
    slow = {**SLOW, "host": "<i>host</i>", "path": XSS_PATH, "client": XSS_CLIENT,
            "backend": "<u>b</u>", "method": "<s>GET</s>", "request_id": '"><img src=x>'}
    site.runtime.inflight = [slow]
    browser.get(site.url + "/")
    wait_for(browser, lambda d: XSS_CLIENT in text_of(d, '[data-group="client"]'),
             "the hostile client listed")
    site.runtime.top[("requests", "client")] = {XSS_CLIENT: [6, 0]}
    wait_for(browser, lambda d: "12 req" in text_of(d, '[data-group="client"]'),
             "a poll (two workers' 6 requests)")
    assert PATH_KEY in text_of(browser, '[data-group="path"]')
    assert "<b>backend</b>" in text_of(browser, '[data-group="backend"]')
    table = text_of(browser, "table.slow")
    for markup in ("<i>host</i>", f"<s>GET</s> {XSS_PATH}", XSS_CLIENT, "<u>b</u>"):
        assert markup in table, (markup, table)
    assert browser.execute_script("return window.__xss") is None
    found = browser.find_elements("css selector", "#heavy img, #heavy svg, #heavy b, #heavy i")
    assert found == []
    assert severe_logs(browser) == []


def test_the_dashboard_works_under_a_strict_content_security_policy(
        lb: Balancer, make_site: Callable[..., Site], browser: Any) -> None:
    """The page and its files carry a Content-Security-Policy allowing their own
    scripts and styles only: the page goes live, draws the heavy hitters' bars
    (their widths set through the CSSOM, not a style attribute) and logs no
    violation; an inline script put into the page runs nothing."""
    for path in ("/", "/static/dashboard.js", "/static/boot.js"):
        status, headers, _ = get(lb.mport, path)
        assert status == 200, path
        policy = headers["content-security-policy"]
        assert "script-src 'self';" in policy and "style-src 'self';" in policy
        assert "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
    site = make_site(hosts={"app.example.com": {"action": "empty", "status": 204}})
    site.runtime.top = {("requests", "client"): {"192.0.2.1": [8, 0], "192.0.2.2": [2, 0]}}
    open_live(browser, site)
    wait_for(browser, lambda d: "192.0.2.2" in text_of(d, '[data-group="client"]'),
             "the heavy hitters")
    widths = browser.execute_script(
        "return [...document.querySelectorAll('[data-group=\"client\"] .heavy-bar')]"
        ".map((e) => e.style.width);")
    assert widths == ["100%", "25%"]
    assert browser.execute_script(
        "return getComputedStyle(document.body).visibility") == "visible"
    assert severe_logs(browser) == []
    browser.execute_script(
        "const s = document.createElement('script'); s.textContent = 'window.__ran = 1;';"
        "document.head.append(s);")
    assert browser.execute_script("return window.__ran") is None
    assert any("Content Security Policy" in entry["message"]
               for entry in browser.get_log("browser"))


# 2. pages on another origin ---------------------------------------------------------------
def test_a_page_on_another_origin_can_neither_deploy_nor_read(lb: Balancer,
                                                              backend: Backend) -> None:
    deploy = json.dumps({"backends": [backend.address]}).encode()
    for headers in ({"Origin": "http://evil.example", "Content-Type": "application/json"},
                    {"Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"},
                    {"Content-Type": "text/plain"},
                    {"Content-Type": "application/x-www-form-urlencoded"}):
        for what in ("deploy", "rollback"):
            status, _, body = get(lb.mport, f"/api/v1/hosts/*/{what}", headers, "POST", deploy)
            assert status in (403, 415), (headers, body)
    status, headers, _ = get(lb.mport, "/api/v1/hosts/*/deploy", {
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"}, "OPTIONS")
    assert status == 403 and "access-control-allow-origin" not in headers
    for path in ("/api/v1/top", "/api/v1/inflight", "/api/v1/history", "/api/v1/deploys", "/"):
        status, headers, _ = get(lb.mport, path, {"Sec-Fetch-Site": "cross-site"})
        assert status == 403 and "access-control-allow-origin" not in headers, path
    assert json.loads(get(lb.mport, "/api/v1/deploys")[2])["deploys"] == []


# 3. a big table -----------------------------------------------------------------------
def test_a_table_of_20000_hosts_draws_a_bounded_page_that_stays_live(
        make_site: Callable[..., Site], browser: Any) -> None:
    hosts = {f"h{n:05d}.example.com": {"action": "proxy", "backends": ["127.0.0.1:9001"]}
             for n in range(20000)}
    site = make_site(hosts=hosts)
    open_live(browser, site)
    cards = browser.find_elements("css selector", "article.host")
    assert len(cards) == 100
    assert "100 of 20,000 hosts shown" in text_of(browser, "#more-hosts")
    browser.find_element("id", "filter").send_keys("h19999.")
    wait_for(browser, lambda d: d.find_elements("css selector",
                                                host_card("h19999.example.com")),
             "the filtered host's card")
    assert len(browser.find_elements("css selector", "article.host")) == 1
    assert not browser.find_elements("css selector", "#more-hosts")
    calls = site.outage.calls
    wait_for(browser, lambda d: site.outage.calls >= calls + 10, "two more polls")
    assert "Live" in text_of(browser, "#status")


# 4. garbage queries -------------------------------------------------------------------------
@pytest.mark.parametrize(("query", "problem"), [
    ("top?window=NaN", "window: must be a number, got 'NaN'"),
    ("top?window=1e309", "window: must be a number, got '1e309'"),
    ("top?window=-1", "window: must be seconds from 1 to 300"),
    ("top?window=0.5", "window: must be seconds from 1 to 300"),
    ("top?window=1_0", "window: must be a number, got '1_0'"),
    ("top?window=%EF%BC%95", "window: must be a number"),  # a full-width 5
    ("top?window=%205", "window: must be a number, got ' 5'"),
    ("top?window=" + "9" * 5000, "got '" + "9" * 40 + "...'"),
    ("top?by=requests&by=bytes", "by: given 2 times; give it once"),
    ("top?by=%3Cscript%3E", "by: must be one of"),
    ("top?group=%FF", "group: must be one of"),
    ("top?limit=1e3", "limit: must be an integer from 1 to 100, got '1e3'"),
    ("inflight?min_age=NaN", "min_age: must be a number"),
    ("inflight?min_age=-1", "min_age: must be >= 0 seconds"),
    ("inflight?min_age=1&min_age=2", "min_age: given 2 times"),
    ("history?since=0.001", "since: must be seconds from 1 to 3600"),
    ("history?since=inf", "since: must be a number"),
    ("history?host=%00", "host: must be a host name of the routing table, got '\\x00'"),
    ("history?host=%3Cscript%3E", "host: must be a host name"),
    ("history?host=" + "a" * 5000, "got '" + "a" * 40 + "...'"),
])
def test_garbage_diagnosis_queries_get_400_naming_the_problem(
        make_site: Callable[..., Site], query: str, problem: str) -> None:
    site = make_site(hosts={"app.example.com": {"action": "empty", "status": 204}})
    port = int(site.url.rsplit(":", 1)[1])
    status, _, body = get(port, "/api/v1/" + query)
    answer = json.loads(body)
    assert status == 400 and answer["error"] == "bad_request", answer
    assert any(problem in d for d in answer["details"]), answer["details"]
    assert len(body) < 1000
    assert get(port, "/api/v1/top?window=60&min_age=huge")[0] == 200  # others' names ignored


def test_in_flight_with_a_huge_min_age_is_empty_and_many_clients_stay_in_the_sketch(
        lb: Balancer) -> None:
    status, _, body = get(lb.mport, "/api/v1/inflight?min_age=1e300")
    assert status == 200 and json.loads(body)["requests"] == []

    def burst(first: int) -> None:
        for n in range(first, first + 400):  # 1,600 distinct clients, one request each
            raw = (f"GET /p{n} HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: 10.9.{n // 250}."
                   f"{n % 250}\r\n\r\n").encode()
            raw_exchange(lb.ports["internal"], raw, until_close=False)
    firsts = itertools.count(0, 400)
    for sent in in_threads(4, lambda: burst(next(firsts))):
        sent.result(60)
    def top(group: str) -> dict[str, Any]:
        return json.loads(get(lb.mport, f"/api/v1/top?group={group}&limit=100")[2])
    wait_until(lambda: sum(t["count"] for t in top("client")["top"]) >= 1600,
               what="the 1,600 requests counted")
    for group in ("client", "path"):
        answer = top(group)
        assert 0 < answer["sketch"]["entries"] <= answer["sketch"]["bound"]
        assert len(answer["top"]) <= 64  # the sketch's keys, though 1,600 were seen
        assert all(t["count"] - t["error"] <= 1 for t in answer["top"])  # one request each


# 5. the terminal: balancerctl's tables --------------------------------------------------------
def test_control_bytes_from_clients_reach_balancerctl_tables_escaped(
        lb: Balancer, capsys: pytest.CaptureFixture[str]) -> None:
    """A forwarded client with control bytes names no client (no IP address: the
    peer counts), and a key holding them, as an older worker could answer, is
    escaped in the table."""
    from management import ctl
    from management.ctl_format import format_top

    raw = (b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: 10.0.0.1\x9b31m\r\n"
           b"Connection: close\r\n\r\n")  # 0x9b: obs-text in a header value, CSI in Latin-1
    # (bytes 0x80-0xff in a path are refused 400 by the parser: only headers carry them)
    assert raw_exchange(lb.ports["internal"], raw).startswith(b"HTTP/1.1 200")
    url = f"http://127.0.0.1:{lb.mport}"
    wait_until(lambda: json.loads(get(lb.mport, "/api/v1/top")[2])["top"], what="the client")
    assert ctl.main(["--url", url, "top"]) == 0
    out = capsys.readouterr().out
    assert "127.0.0.1" in out and "10.0.0.1" not in out, out
    answer = json.loads(get(lb.mport, "/api/v1/top")[2])
    answer["top"][0]["key"] = "10.0.0.1\x9b31m\x1b[2J"
    out = format_top(answer)
    assert "10.0.0.1\\x9b31m\\x1b[2J" in out, out
    assert not any(0x80 <= ord(ch) < 0xa0 or ch == "\x1b" for ch in out), out


# 6. a worker that does not answer ---------------------------------------------------------------
def test_a_stopped_worker_costs_the_page_one_ask_timeout_not_one_per_part(
        tmp_path: Path, backend: Backend) -> None:
    import os
    import re
    import signal
    import time

    lb = Balancer(tmp_path, {"*": {"action": "proxy", "backends": [backend.address]}},
                  args=["--workers", "2"])
    stopped = None
    try:
        wait_until(lambda: len(re.findall(r"worker (\d+) ready", lb.output())) == 2,
                   what="two workers")
        stopped = int(re.findall(r"worker (\d+) ready", lb.output())[0])
        os.kill(stopped, signal.SIGSTOP)
        started = time.monotonic()
        status, _, page = get(lb.mport, "/")
        took = time.monotonic() - started
        assert status == 200
        state = json.loads(embedded_state(page.decode()))
        assert state["heavy"]["tops"]["client"]["workers"] == 1  # the other one answered
        assert took < 8, f"the page took {took:.1f}s (six asks one after the other: 12 s)"
    finally:
        if stopped:
            os.kill(stopped, signal.SIGCONT)
        lb.stop()
