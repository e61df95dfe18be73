"""The live dashboard (issue 7) in a real headless Chromium, against the real management app.

The app is `management.app.create_app` over a file store in tmp, served by gevent's
pywsgi on 127.0.0.1 port 0 (`serve_wsgi`). The data plane is `ScriptedRuntime`: real
`balancer.stats.Stats` counters that the tests move, as a worker would.

``python -m pytest tests/test_dashboard.py -k screenshot -s`` saves and prints
``dashboard.png`` (laptop) and ``dashboard-phone.png`` in the test's tmp directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from balancer.stats import Stats
from balancer.stores import Store, open_store
from management.app import create_app
from management.history import History
from management.runtime import snapshot_of
from tests.support import ScriptedHealth

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run")
LAPTOP = (1366, 900)
PHONE = (390, 844)
WAIT = 10.0  # seconds: a few poll periods (2 s) plus start-up
# chromedriver's bound on any command waiting for the renderer (a load, a window
# resize): a renderer starved on a loaded 2-core CI machine took over 10 s once
RENDERER_WAIT = 30.0
TOKEN = "dashboard-s3cret"
WEB = {"action": "proxy", "backends": ["127.0.0.1:9001", {"address": "127.0.0.1:9002",
                                                           "weight": 3}]}


# ---------------------------------------------------------------------------
# the scripted data plane
# ---------------------------------------------------------------------------

class ScriptedRuntime:
    """A `management.runtime.Runtime` whose counters the test moves (the edge we script)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.counters = Stats()
        self.lock = threading.Lock()  # the app reads from the server thread
        self.failing = False
        self.store_up = True
        self.workers = 2
        self.last_reload = time.time() - 95
        self.top: dict[tuple[str, str], dict[str, list[int]]] = {}  # (by, group) → counts
        self.inflight: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def edit(self) -> Iterator[Stats]:
        with self.lock:
            yield self.counters

    def stats(self, select: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.failing:
            raise RuntimeError("scripted failure of the stats source")
        with self.lock:
            snapshot = snapshot_of(self.counters, select)
        snapshot.update(routing_version=self.store.load().version, store_up=int(self.store_up),
                        config_reloads=3, last_reload=self.last_reload)
        return snapshot

    def reload(self) -> int:
        return self.store.load().version

    def ask_all(self, command: str) -> list[dict[str, Any]]:
        """Two workers' answers to `top` and `inflight` (management.diagnosis merges them)."""
        name, _, text = command.partition(" ")
        query = json.loads(text)
        if name == "top":
            counts = self.top.get((query["by"], query["group"]), {})
            return [{"pid": 1, "counts": counts, "sketch": {"entries": 1, "bound": 9}},
                    {"pid": 2, "counts": counts, "sketch": {"entries": 1, "bound": 9}}]
        return [{"pid": 1, "requests": [r for r in self.inflight
                                        if r["age"] >= query["min_age"]], "left_out": 0}]

    def is_ready(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        return {"workers": self.workers,
                "store": {"kind": self.store.kind, "url": self.store.display_url,
                          "reachable": self.store_up, "version": self.store.load().version,
                          "last_reload": self.last_reload, "problem": None}}


def mark_down(stats: Stats, key: str, address: str, failures: int) -> None:
    backend = stats.host(key).backend(address)
    backend.source, backend.failures = ScriptedHealth("down"), failures


def serve_requests(stats: Stats, key: str, n: int, status: int = 200,
                   backend: str | None = None) -> None:
    """Count `n` finished requests on `key` as the data plane would."""
    host = stats.host(key)
    for _ in range(n):
        host.open_requests += 1
        host.finish(status, 420, 5300, 0.012)
        if backend is not None:
            host.backend(backend).successes += 1


class Site:
    """One management app on a real socket, its store and its scripted runtime."""

    def __init__(self, url: str, store: Store, runtime: ScriptedRuntime,
                 token: str | None) -> None:
        self.url = url
        self.store = store
        self.runtime = runtime
        self.token = token
        self.outage: ApiOutage | None = None

    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


class ApiOutage:
    """WSGI middleware: while `down`, every ``/api/v1/*`` call fails with 503 (the
    dashboard page itself is still served); `calls` counts the API calls made, and
    `table_polls` lists each ``/api/v1/hosts`` poll's If-None-Match and status."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.down = False
        self.calls = 0
        self.table_polls: list[tuple[str | None, int]] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if not environ["PATH_INFO"].startswith("/api/"):
            return self.app(environ, start_response)
        self.calls += 1
        if not self.down and environ["PATH_INFO"] == "/api/v1/hosts":
            def noted(status: str, headers: Any, *rest: Any) -> Any:
                self.table_polls.append((environ.get("HTTP_IF_NONE_MATCH"), int(status[:3])))
                return start_response(status, headers, *rest)
            return self.app(environ, noted)
        if not self.down:
            return self.app(environ, start_response)
        body = (b'{"error":"store_unavailable","message":"scripted outage",'
                b'"details":["redis: connection refused",{"not":"text"}]}')
        start_response("503 Service Unavailable", [("Content-Type", "application/json"),
                                                   ("Content-Length", str(len(body)))])
        return [body]


@pytest.fixture
def make_site(tmp_path: Path, serve_wsgi: Callable[[Any], str]) -> Callable[..., Site]:
    def make(token: str | None = None, hosts: dict[str, Any] | None = None,
             history: History | None = None) -> Site:
        store = open_store("file:" + str(tmp_path / "routes.json"))
        if hosts:
            store.replace(hosts)
        runtime = ScriptedRuntime(store)
        outage = ApiOutage(create_app(store=store, runtime=runtime, token=token,
                                      history=history))
        site = Site(serve_wsgi(outage), store, runtime, token)
        site.outage = outage
        return site
    return make


# ---------------------------------------------------------------------------
# the browser
# ---------------------------------------------------------------------------

def require_chromium() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if not missing:
        return
    reason = f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI needs a real browser: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """One headless Chromium for the module; each test opens its own origin (new port)."""
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="dashboard-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(RENDERER_WAIT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def browser(chromium: Any) -> Any:
    chromium.set_window_size(*LAPTOP)
    chromium.get_log("browser")  # drop what earlier tests logged
    return chromium


def wait_for(driver: Any, predicate: Callable[[Any], Any], what: str,
             timeout: float = WAIT) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout, poll_frequency=0.05,
                         ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(predicate, message=f"timed out after {timeout}s waiting for {what}")


def text_of(driver: Any, css: str) -> str:
    """The visible text of the first element matching `css`, "" when there is none: read
    in the page in one step (bug: found, then read, the element could be replaced by the
    next poll's render in between: StaleElementReferenceException in CI)."""
    script = "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';"
    return str(driver.execute_script(script, css)).strip()


def each(driver: Any, css: str, read: str) -> list[Any]:
    """`read` (a JavaScript expression of the element `e`) for every element matching
    `css`, all read in the page in one step: a card, row or table is drawn again at
    every poll, so an element found here is stale by the next one (as in `text_of`)."""
    script = f"return [...document.querySelectorAll(arguments[0])].map((e) => {read});"
    return list(driver.execute_script(script, css))


def host_card(host: str) -> str:
    return f'article.host[data-host="{host}"]'


def severe_logs(driver: Any) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def open_live(driver: Any, site: Site) -> None:
    driver.get(site.url + "/")
    wait_for(driver, lambda d: "Live" in text_of(d, "#status"), "the page to go live")


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------

def test_page_loads_live_without_console_errors(make_site: Callable[..., Site],
                                                browser: Any) -> None:
    site = make_site(hosts={"app.example.com": WEB})
    open_live(browser, site)
    wait_for(browser, lambda d: d.find_elements("css selector", host_card("app.example.com")),
             "the configured host")
    assert "proxy" in text_of(browser, host_card("app.example.com") + " .action").lower()
    assert "2 workers" in text_of(browser, '[data-tile="workers"]')
    store_tile = text_of(browser, '[data-tile="store"]')
    assert "file" in store_tile and "reachable" in store_tile
    assert "updated" in text_of(browser, "#last-update")
    browser.find_element("id", "filter").send_keys("nomatch")
    assert "No host matches" in text_of(browser, "#hosts")
    assert severe_logs(browser) == []


def test_host_added_through_the_api_appears_without_reload(make_site: Callable[..., Site],
                                                           browser: Any) -> None:
    site = make_site()
    open_live(browser, site)
    assert "No hosts" in text_of(browser, "#hosts")
    browser.execute_script("window.__sameDocument = true")
    site.api("PUT", "/api/v1/hosts/new.example.com",
             {"action": "redirect", "to": "https://elsewhere.example", "status": 302})
    card = wait_for(browser, lambda d: text_of(d, host_card("new.example.com")),
                    "the new host's card")
    assert "redirect" in card.lower() and "https://elsewhere.example" in card
    assert browser.execute_script("return window.__sameDocument") is True, "the page reloaded"


@pytest.mark.slow  # three 2 s polls in Chromium: 6-8 s
def test_an_unchanged_table_is_polled_with_if_none_match(make_site: Callable[..., Site],
                                                         browser: Any) -> None:
    """Each poll names the table held (the embedded one first); a 304 keeps it, a
    change is drawn and its version named next."""
    site = make_site(hosts={"app.example.com": WEB})
    open_live(browser, site)
    polls = site.outage.table_polls if site.outage else []
    wait_for(browser, lambda d: ('"1"', 304) in polls, "a poll answered 304")
    assert polls[0] == ('"1"', 304), polls  # the embedded table's version
    site.api("PUT", "/api/v1/hosts/new.example.com", {"action": "empty", "status": 410})
    wait_for(browser, lambda d: text_of(d, host_card("new.example.com")), "the new host's card")
    wait_for(browser, lambda d: ('"2"', 304) in polls, "the new version named")
    # the card is drawn again at each poll: read through wait_for, which retries a stale one
    wait_for(browser, lambda d: text_of(d, host_card("app.example.com")),
             "the table kept on 304 (it was lost)")
    assert "Live" in text_of(browser, "#status") and severe_logs(browser) == []


def test_backend_going_down_is_shown_down(make_site: Callable[..., Site], browser: Any) -> None:
    site = make_site(hosts={"app.example.com": WEB})
    with site.runtime.edit() as stats:
        serve_requests(stats, "app.example.com", 10, backend="127.0.0.1:9001")
        serve_requests(stats, "app.example.com", 10, backend="127.0.0.1:9002")
    open_live(browser, site)
    row = host_card("app.example.com") + ' tr[data-backend="127.0.0.1:9002"]'
    wait_for(browser, lambda d: "up" in text_of(d, row), "the backend shown up")
    with site.runtime.edit() as stats:
        mark_down(stats, "app.example.com", "127.0.0.1:9002", failures=3)

    wait_for(browser, lambda d: each(d, row, "e.classList.contains('backend-down')") == [True],
             "the backend marked down")
    assert "down" in text_of(browser, row + " .backend-state")
    assert "3 failures" in text_of(browser, row)
    assert "1 of 2 backends down" in text_of(browser, host_card("app.example.com"))
    other = host_card("app.example.com") + ' tr[data-backend="127.0.0.1:9001"]'
    assert each(browser, other, "e.classList.contains('backend-up')") == [True]


def test_a_probing_backend_is_not_shown_up(make_site: Callable[..., Site],
                                           browser: Any) -> None:
    site = make_site(hosts={"app.example.com": WEB})
    with site.runtime.edit() as stats:
        serve_requests(stats, "app.example.com", 10, backend="127.0.0.1:9002")
        backend = stats.host("app.example.com").backend("127.0.0.1:9002")
        backend.source, backend.failures = ScriptedHealth("probing"), 4
    open_live(browser, site)
    row = host_card("app.example.com") + ' tr[data-backend="127.0.0.1:9002"]'
    wait_for(browser, lambda d: "probing" in text_of(d, row), "the backend shown probing")
    assert each(browser, row, "e.classList.contains('backend-probing')") == [True]
    assert "1 of 2 backends down" in text_of(browser, host_card("app.example.com"))


def test_with_a_token_the_page_asks_for_it_then_shows_data(make_site: Callable[..., Site],
                                                           browser: Any) -> None:
    site = make_site(token=TOKEN, hosts={"app.example.com": WEB})
    browser.get(site.url + "/")
    wait_for(browser, lambda d: d.find_element("id", "token").is_displayed(), "the token form")
    assert "needs a token" in text_of(browser, "#token-message")
    assert not browser.find_elements("css selector", host_card("app.example.com"))

    browser.find_element("id", "token-input").send_keys("wrong-token")
    browser.find_element("css selector", "#token-form button[type=submit]").click()
    wait_for(browser, lambda d: "rejected" in text_of(d, "#token-message"), "the rejection")

    browser.find_element("id", "token-input").send_keys(TOKEN)
    browser.find_element("css selector", "#token-form button[type=submit]").click()
    wait_for(browser, lambda d: text_of(d, host_card("app.example.com")), "data after sign-in")
    assert not browser.find_element("id", "token").is_displayed()
    assert "Live" in text_of(browser, "#status")
    assert TOKEN not in browser.current_url
    stored = browser.execute_script("return sessionStorage.getItem('balancer.token')")
    assert stored == TOKEN


def test_api_error_shows_a_banner_and_marks_figures_stale(make_site: Callable[..., Site],
                                                          browser: Any) -> None:
    site = make_site(hosts={"app.example.com": WEB})
    open_live(browser, site)
    assert text_of(browser, "#banners") == ""
    site.runtime.failing = True
    wait_for(browser, lambda d: "failed (HTTP 500)" in text_of(d, "#banners"), "the error banner")
    assert "not live" in text_of(browser, "#banners")
    assert "Stale" in text_of(browser, "#status")
    assert "is-stale" in browser.find_element("tag name", "body").get_attribute("class")
    site.runtime.failing = False
    wait_for(browser, lambda d: "Live" in text_of(d, "#status"), "recovery")
    assert text_of(browser, "#banners") == ""


def test_store_down_is_announced(make_site: Callable[..., Site], browser: Any) -> None:
    site = make_site(hosts={"app.example.com": WEB})
    open_live(browser, site)
    site.runtime.store_up = False
    wait_for(browser, lambda d: "Store unreachable" in text_of(d, "#banners"), "the store banner")
    assert "unreachable" in text_of(browser, '[data-tile="store"]')


SPELLED = WEB["backends"][0].replace("127.0.0.1", "0x7f.1")  # (a name before 2026-12-07)


@pytest.mark.parametrize("old, title, line", [
    ({**WEB, "health": {"interval": 0.05}}, "Health check values raised",
     "app.example.com health.interval 0.05 s → 0.1 s"),
    ({**WEB, "backends": [SPELLED]}, "Stored backend addresses used otherwise",
     f"app.example.com {SPELLED} → {WEB['backends'][0]}")])
def test_stored_values_used_otherwise_are_announced(
        make_site: Callable[..., Site], browser: Any, tmp_path: Path, old: dict[str, Any],
        title: str, line: str) -> None:
    """A table an earlier version stored with a check interval below the floor, or a
    backend spelled ``0x7f.1:P``, is served with it raised or written in full
    (docs/rules.md): the dashboard says which, until the rule is written again."""
    (tmp_path / "routes.json").write_text(json.dumps({"version": 4,
                                                      "hosts": {"app.example.com": old}}))
    site = make_site()
    open_live(browser, site)
    banner = wait_for(browser, lambda d: text_of(d, "#banners"), "the raised values banner")
    assert title in banner
    assert line in banner
    site.api("PUT", "/api/v1/hosts/app.example.com", WEB)
    wait_for(browser, lambda d: text_of(d, "#banners") == "", "the banner gone")


RATES_SCRIPT = """
const done = arguments[arguments.length - 1];
Promise.all([import("/static/history.js"), import("/static/format.js")]).then(([h, f]) => {
  const counters = (completed, errors) =>
    ({x: {completed_requests: completed, responses: {"5xx": errors}}});
  const history = new h.History();
  history.record(counters(100, 0), 0);
  history.record(counters(120, 5), 2000);   // 20 requests in 2 s, 5 of them 5xx
  history.record(counters(10, 0), 4000);    // a worker restarted: counters went down
  history.record(counters(10, 0), 6000);    // idle
  history.record(counters(10, 0), 4000 + h.WINDOW_MS);
  const points = history.points("x");
  history.record({}, 9e6);                  // the host left the stats
  done({points, gone: history.points("x").length,
        text: [f.rate(0.25), f.rate(12.4), f.bytes(1536), f.bytes(512), f.percent(2.5),
               f.count(1, "host"), f.count(2, "host"), f.count(undefined, "host")]});
}).catch((err) => done({error: String(err)}));
"""


def test_rates_come_from_counter_deltas(make_site: Callable[..., Site], browser: Any) -> None:
    site = make_site()
    open_live(browser, site)
    result = browser.execute_async_script(RATES_SCRIPT)
    assert "error" not in result, result
    rps = [p["rps"] for p in result["points"]]
    errors = [p["errorPct"] for p in result["points"]]
    # the 2 s point fell out of the 5-minute window; the reset is a gap, never negative
    assert rps == [None, 0, 0] and errors == [None, None, None]
    result = browser.execute_async_script(RATES_SCRIPT.replace("4000 + h.WINDOW_MS", "7000"))
    assert [p["rps"] for p in result["points"]][0] == 10
    assert result["points"][0]["errorPct"] == 25
    assert result["gone"] == 0
    assert result["text"] == ["0.3 req/s", "12 req/s", "1.5 KiB", "512 B", "2.5 %",
                              "1 host", "2 hosts", "—"]


def test_screenshot(make_site: Callable[..., Site], browser: Any, tmp_path: Path) -> None:
    history = History()  # a minute of the management process's samples: full charts at once
    start = time.time() - 60
    for n in range(12):
        sampled = Stats()
        serve_requests(sampled, "app.example.com", 40 * n)
        history.sample(sampled.snapshot(), start + 5 * n)
    site = make_site(history=history, hosts={
        "app.example.com": {**WEB, "health": {"path": "/healthz"}},
        "api.example.com": {"action": "proxy", "backends": ["10.0.0.5:8000", "10.0.0.6:8000"],
                            "algorithm": "least_connections", "retries": 2},
        "deploy.example.com": {"action": "spin", "timeout": 120},
        "old.example.com": {"action": "redirect", "to": "https://app.example.com",
                            "status": 301, "keep_path": True},
    })
    with site.runtime.edit() as stats:
        # the page keeps the seeded history of the hosts in the stats only
        serve_requests(stats, "app.example.com", 9, backend="127.0.0.1:9002")
        stats.open_connections = 42
        stats.host("deploy.example.com").spinning = 3
        mark_down(stats, "api.example.com", "10.0.0.6:8000", failures=7)
    line = host_card("app.example.com") + " .chart-rps .spark-line"

    def segments(driver: Any) -> int:
        return int(driver.execute_script(
            "const e = document.querySelector(arguments[0]);"
            "return e ? (e.getAttribute('d').match(/L/g) || []).length : 0;", line))

    with traffic(site.runtime):
        open_live(browser, site)
        seeded = wait_for(browser, segments, "the line of the seeded history")
        assert seeded >= 5
        wait_for(browser, lambda d: segments(d) > seeded, "a point of the live polls after them",
                 timeout=20)
    assert "req/s" in text_of(browser, host_card("app.example.com") + " .fig-rps")
    laptop = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(laptop))
    browser.set_window_size(*PHONE)
    overflow = browser.execute_script(
        "return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
    phone = tmp_path / "dashboard-phone.png"
    assert browser.save_screenshot(str(phone))
    assert severe_logs(browser) == []
    print(f"\ndashboard screenshots: {laptop} {phone}")


@contextlib.contextmanager
def traffic(runtime: ScriptedRuntime) -> Iterator[None]:
    """Steady scripted traffic on a few hosts (a thread) while the block runs."""
    stop = threading.Event()

    def run() -> None:
        tick = 0
        while not stop.wait(0.1):
            tick += 1
            with runtime.edit() as stats:
                serve_requests(stats, "app.example.com", 9 + tick % 7, backend="127.0.0.1:9002")
                serve_requests(stats, "app.example.com", 3, backend="127.0.0.1:9001")
                serve_requests(stats, "api.example.com", 4, backend="10.0.0.5:8000")
                serve_requests(stats, "api.example.com", tick % 3 == 0, 502)
                serve_requests(stats, "(unknown)", tick % 2, 404)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


# ---------------------------------------------------------------------------
# first paint (issue 17): the page arrives with the current state in it
# ---------------------------------------------------------------------------

LONG_V6 = "[2001:db8:1234:5678:9abc:def0:1234:5678]:65535"
FIRST_SIGHT = {
    "app.example.com": WEB,
    "wide.example.com": {"action": "proxy", "backends": [LONG_V6, "127.0.0.1:9003"]},
}

# Runs before any script of the page: at each frame (requestAnimationFrame runs just
# before the browser paints), until the first frame in which the page is visible,
# then records what that frame shows.
FIRST_FRAME_RECORDER = """
(() => {
  const record = () => {
    const body = document.body;
    if (!body || getComputedStyle(body).visibility === "hidden") {
      requestAnimationFrame(record);
      return;
    }
    window.__firstFrame = {
      status: document.getElementById("status")?.textContent || "",
      hosts: [...document.querySelectorAll("article.host")].map((a) => a.dataset.host),
      connections: document.querySelector('[data-tile="connections"]')?.textContent || "",
      at: performance.now(),
    };
  };
  requestAnimationFrame(record);
})();
"""


def test_index_embeds_the_current_state_only_without_a_token(
        make_site: Callable[..., Site]) -> None:
    hostile = {"action": "static", "body": "</script><script>alert(1)</script>&amp;"}
    site = make_site(hosts={"app.example.com": WEB, "x.example.com": hostile})
    with site.runtime.edit() as stats:
        stats.open_connections = 7
    with urllib.request.urlopen(site.url + "/", timeout=10) as response:
        page = response.read().decode()
        assert response.headers["Cache-Control"] == "no-store"
    embedded = page.split('<script id="initial-state" type="application/json">')[1]
    embedded = embedded.split("</script>")[0]
    assert "<" not in embedded and "&amp;" not in embedded
    state = json.loads(embedded)
    assert state["table"]["hosts"]["x.example.com"] == hostile
    assert state["stats"]["open_connections"] == 7 and state["info"]["workers"] == 2

    secret = make_site(token=TOKEN, hosts={"app.example.com": WEB})
    with urllib.request.urlopen(secret.url + "/", timeout=10) as response:
        page = response.read().decode()
    assert '<script id="initial-state" type="application/json">null</script>' in page
    assert "app.example.com" not in page


def test_first_paint_shows_the_data_before_any_poll(make_site: Callable[..., Site],
                                                    browser: Any, tmp_path: Path) -> None:
    site = make_site(hosts=FIRST_SIGHT)
    with site.runtime.edit() as stats:
        stats.open_connections = 42
        serve_requests(stats, "app.example.com", 5, backend="127.0.0.1:9001")
    site.outage.down = True  # whatever the page shows can only come from the page itself
    script = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                                     {"source": FIRST_FRAME_RECORDER})
    try:
        browser.get(site.url + "/")
        first = wait_for(browser, lambda d: d.execute_script("return window.__firstFrame"),
                         "the first visible frame")
        calls_by_then = site.outage.calls
        shot = tmp_path / "dashboard-first-paint.png"
        assert browser.save_screenshot(str(shot))
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument",
                                {"identifier": script["identifier"]})
    assert "Live" in first["status"] and "Waiting" not in first["status"], first
    assert "no data yet" not in first["status"]
    assert first["hosts"] == ["app.example.com", "wide.example.com"], first
    assert "42" in first["connections"]
    assert calls_by_then == 0, "the first paint waited for a poll"
    # the first poll fails (the scripted outage): the page says so instead of going blank
    wait_for(browser, lambda d: "Stale" in text_of(d, "#status"), "the failed poll")
    assert "scripted outage: redis: connection refused" in text_of(browser, "#banners")
    assert "object" not in text_of(browser, "#banners")  # only text details are shown
    assert text_of(browser, host_card("app.example.com"))
    print(f"\nfirst paint: {shot}")


def test_chromium_screenshot_of_the_address_shows_data(make_site: Callable[..., Site],
                                                       tmp_path: Path) -> None:
    """What the issue did: `chromium --headless --screenshot` of the management address."""
    require_chromium()
    site = make_site(hosts=FIRST_SIGHT)
    site.outage.down = True
    shot = tmp_path / "first-sight.png"
    base = [CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1366,900", "--virtual-time-budget=1000"]
    done = subprocess.run([*base, f"--screenshot={shot}", site.url + "/"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and shot.stat().st_size > 10_000, done.stderr
    dom = subprocess.run([*base, "--dump-dom", site.url + "/"], capture_output=True, text=True,
                         timeout=60).stdout
    assert 'data-host="app.example.com"' in dom and 'data-host="wide.example.com"' in dom
    assert "Waiting" not in dom and "no data yet" not in dom
    print(f"\nchromium --screenshot: {shot}")


def test_backend_addresses_stay_on_one_line(make_site: Callable[..., Site],
                                            browser: Any) -> None:
    site = make_site(hosts=FIRST_SIGHT)
    for size in (LAPTOP, PHONE):
        browser.set_window_size(*size)
        open_live(browser, site)
        cells = browser.execute_script("""
            return [...document.querySelectorAll("td.backend-address")].map((td) => {
              const style = getComputedStyle(td);
              return {text: td.textContent, title: td.title,
                      height: td.getBoundingClientRect().height,
                      line: parseFloat(style.lineHeight) + parseFloat(style.paddingTop)
                            + parseFloat(style.paddingBottom),
                      cut: td.scrollWidth > td.clientWidth, overflow: style.textOverflow};
            });""")
        assert {c["text"] for c in cells} >= {LONG_V6, "127.0.0.1:9001"}, cells
        for cell in cells:
            assert cell["height"] <= cell["line"] + 2, f"{cell['text']} wraps at {size}"
            assert cell["title"] == cell["text"]
            assert not cell["cut"] or cell["overflow"] == "ellipsis"
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0


def test_short_addresses_are_whole_at_1280_px(make_site: Callable[..., Site],
                                               browser: Any) -> None:
    """An IPv4 address and port (up to 21 characters) is never cut on a 1280 px
    screen; a longer one is cut with an ellipsis and its title is the whole address."""
    widest_v4 = "192.168.100.200:65535"
    site = make_site(hosts={**FIRST_SIGHT, "v4.example.com": {
        "action": "proxy", "backends": [widest_v4, "10.0.0.1:80"]}})
    browser.set_window_size(1280, 900)
    open_live(browser, site)
    cells = browser.execute_script("""
        return [...document.querySelectorAll("td.backend-address")].map((td) => ({
          text: td.textContent, title: td.title, cut: td.scrollWidth > td.clientWidth,
          spill: td.closest("table").getBoundingClientRect().right
                 - td.closest("article").getBoundingClientRect().right}));""")
    assert {c["text"] for c in cells} == {"127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003",
                                          LONG_V6, widest_v4, "10.0.0.1:80"}, cells
    for cell in cells:
        assert cell["title"] == cell["text"]
        assert cell["cut"] == (len(cell["text"]) > len(widest_v4)), cell
        assert cell["spill"] <= 0, f"the table of {cell['text']} spills out of its card"
    assert browser.execute_script(
        "return document.documentElement.scrollWidth - window.innerWidth") <= 0


def test_a_removed_host_leaves_the_page(make_site: Callable[..., Site], browser: Any) -> None:
    site = make_site(hosts={"app.example.com": WEB,
                            "old.example.com": {"action": "empty", "status": 410}})
    with site.runtime.edit() as stats:
        serve_requests(stats, "old.example.com", 3, 410)  # the stats keep counting it
    open_live(browser, site)
    wait_for(browser, lambda d: text_of(d, host_card("old.example.com")), "the host's card")
    assert text_of(browser, "#removed-line") == ""
    site.api("DELETE", "/api/v1/hosts/old.example.com")
    wait_for(browser, lambda d: not d.find_elements("css selector", host_card("old.example.com")),
             "the removed host's card to go")
    line = wait_for(browser, lambda d: text_of(d, "#removed-line"), "the recently removed line")
    assert line.startswith("Recently removed: old.example.com (")
    assert text_of(browser, host_card("app.example.com"))
    site.api("PUT", "/api/v1/hosts/old.example.com", {"action": "empty", "status": 204})
    wait_for(browser, lambda d: text_of(d, host_card("old.example.com")), "the host back")
    assert text_of(browser, "#removed-line") == ""


def test_a_running_deploy_shows_on_its_host_card_and_recent_deploys_below(
        make_site: Callable[..., Site], browser: Any) -> None:
    site = make_site(hosts={"app.example.com": WEB})
    now = time.time()
    records = site.store.records()  # (saved unclaimed, as a start withdrawn: never resumed)
    records.withdraw({
        "id": "d-old", "host": "app.example.com", "kind": "deploy", "state": "failed",
        "step": "ready", "started": now - 600, "ended": now - 590,
        "from": ["127.0.0.1:9001"], "to": ["127.0.0.1:9009"], "warning": None,
        "error": "not ready after 10s (127.0.0.1:9009: connect: refused); nothing was switched",
        "steps": [{"name": "ready", "started": now - 600, "ended": now - 590,
                   "outcome": "failed", "detail": "refused"}]})
    records.withdraw({
        "id": "d-now", "host": "app.example.com", "kind": "deploy", "state": "running",
        "step": "drain", "started": now - 12, "ended": None, "error": None, "warning": None,
        "from": ["127.0.0.1:9001"], "to": ["127.0.0.1:9003"],
        "steps": [{"name": "ready", "started": now - 12, "ended": now - 10, "outcome": "ok",
                   "detail": "up"},
                  {"name": "drain", "started": now - 3, "ended": None, "outcome": None,
                   "detail": "waiting for 127.0.0.1:9001"}]})
    open_live(browser, site)
    line = wait_for(browser, lambda d: text_of(d, host_card("app.example.com") + " .deploy-line"),
                    "the running deploy on the host card")
    assert "deploy: drain" in line and "127.0.0.1:9003" in line and "127.0.0.1:9001" in line
    table = text_of(browser, ".deploys-table")
    assert "d-now" not in table  # ids stay out of the way; rows carry them as data
    rows = each(browser, ".deploys-table tbody tr", "[e.dataset.deploy, e.innerText]")
    assert [deploy for deploy, _ in rows] == ["d-now", "d-old"]
    assert "nothing was switched" in rows[1][1] and "running" in rows[0][1]
    aborting = {**records.deploy("d-now"), "abort": {"by": "web2", "since": now}}
    aborting["steps"] = [*aborting["steps"][:1],
                         {**aborting["steps"][1], "ended": now, "outcome": "aborted"},
                         {"name": "abort", "started": now, "ended": None, "outcome": None,
                          "detail": "back to 127.0.0.1:9001"}]
    records.withdraw(aborting)
    card_line = host_card("app.example.com") + " .deploy-line"
    line = wait_for(browser, lambda d: "(aborting)" in text_of(d, card_line) and text_of(
        d, card_line), "the abort on the host card")
    assert "deploy: drain (aborting)" in line and "back to 127.0.0.1:9001" in line, line
    aborting["steps"][2].update(ended=time.time(), outcome="drained")
    records.withdraw({**aborting, "state": "aborted", "ended": time.time()})
    wait_for(browser, lambda d: not d.find_elements("css selector", ".deploy-line"),
             "the deploy line to go once the deploy ended")
    row = wait_for(browser, lambda d: next((text for deploy, text in each(
        d, ".deploys-table tbody tr", "[e.dataset.deploy, e.innerText]")
        if deploy == "d-now" and "aborted:" in text), None), "the aborted row")
    assert "aborted: back to 127.0.0.1:9001" in row, row
    assert severe_logs(browser) == []


SLOW = {"host": "files.example.com", "rule": "files.example.com", "method": "GET",
        "path": "/iso/big.iso", "client": "198.51.100.4", "backend": "10.0.0.5:8080",
        "bytes_sent": 73400320, "bytes_received": 0, "age": 41.2, "status": 200,
        "request_id": "r1"}


def test_whats_heavy_latency_and_full_charts_on_first_paint(
        make_site: Callable[..., Site], browser: Any, tmp_path: Path) -> None:
    history = History()
    start = time.time() - 120
    for n in range(25):  # two minutes of the management process's samples
        with_requests = Stats()
        serve_requests(with_requests, "app.example.com", 50 * n)
        history.sample(with_requests.snapshot(), start + 5 * n)
    site = make_site(hosts={"app.example.com": WEB}, history=history)
    site.runtime.top = {("requests", "client"): {"203.0.113.9": [900, 0], "10.0.0.7": [40, 2]},
                        ("requests", "path"): {"app.example.com/api": [800, 0]},
                        ("bytes", "client"): {"198.51.100.4": [5 << 20, 0]}}
    site.runtime.inflight = [SLOW]
    with site.runtime.edit() as stats:
        serve_requests(stats, "app.example.com", 20, backend="127.0.0.1:9001")
    site.outage.down = True  # the first paint alone: charts and panel from the embedded state
    browser.get(site.url + "/")
    card = host_card("app.example.com")
    wait_for(browser, lambda d: text_of(d, card), "the host card")
    points = browser.execute_script(
        "return document.querySelectorAll(arguments[0]).length", card + " .chart-rps path")
    assert points >= 2, "the requests/s chart is empty on first paint"
    assert "17.5 ms" in text_of(browser, card + " .fig-p50")  # inside the 10-25 ms bucket
    assert text_of(browser, card + " .chart-p99")
    clients = text_of(browser, '[data-group="client"]')
    assert clients.index("203.0.113.9") < clients.index("10.0.0.7")
    assert "1800 req" in clients  # two workers' counts summed
    assert "app.example.com/api" in text_of(browser, '[data-group="path"]')
    slow = text_of(browser, "table.slow")
    assert "/iso/big.iso" in slow and "41.2 s" in slow and "70.0 MiB" in slow
    site.outage.down = False
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "heavy-by")).select_by_value("bytes")
    wait_for(browser, lambda d: "10.0 MiB" in text_of(d, '[data-group="client"]'),
             "the panel ranked by bytes")
    browser.set_window_size(*PHONE)
    width = browser.execute_script("return document.documentElement.scrollWidth")
    assert width <= PHONE[0], "the page scrolls sideways on a phone"
    shot = tmp_path / "dashboard-heavy-phone.png"
    assert browser.save_screenshot(str(shot))
    print(f"\nwhat's heavy on a phone: {shot}")


def test_certificates_are_listed_soonest_first_expiring_ones_in_colour(
        make_site: Callable[..., Site], browser: Any) -> None:
    from balancer.certificates import make_record
    from tests.test_tls import CA

    site = make_site(hosts={"app.example.com": WEB})
    certs = site.store.certs()
    chain, key = CA.issue("app.example.com", days=365)
    certs.put("app.example.com", make_record("app.example.com", chain, key))
    chain, key = CA.issue("soon.example.com", days=6)
    certs.put("soon.example.com", make_record("soon.example.com", chain, key))
    open_live(browser, site)
    wait_for(browser, lambda d: d.find_elements("css selector", ".certs-table tbody tr"),
             "the certificates table")
    rows = each(browser, ".certs-table tbody tr", "[e.dataset.host, [...e.classList], "
                "getComputedStyle(e.querySelector('.cert-left')).color]")
    assert [host for host, _, _ in rows] == ["soon.example.com", "app.example.com"]
    assert "cert-soon" in rows[0][1] and "cert-ok" in rows[1][1]
    assert rows[0][2] != rows[1][2]  # the colour of the time left
    assert key.splitlines()[1] not in browser.page_source
    assert severe_logs(browser) == []


def test_acme_hosts_show_their_state_with_or_without_a_certificate(
        make_site: Callable[..., Site], browser: Any) -> None:
    from balancer.certificates import make_record
    from tests.test_tls import CA

    acme = {**WEB, "tls": "acme"}
    site = make_site(hosts={"app.example.com": acme, "new.example.com": acme,
                            "down.example.com": acme})
    chain, key = CA.issue("app.example.com", days=365)
    site.store.certs().put("app.example.com",
                           make_record("app.example.com", chain, key, "acme"))
    states = site.store.acme()
    states.put_state("app.example.com", {"state": "issued", "renew_at": time.time() + 9e6})
    states.put_state("down.example.com", {
        "state": "failed", "attempts": 2, "next_retry": time.time() + 600,
        "reason": "validation failed: down.example.com: connection refused"})
    open_live(browser, site)
    wait_for(browser, lambda d: len(d.find_elements("css selector", ".certs-table tbody tr"))
             == 3, "a row per ACME host")
    cells = {host: (text, colour) for host, text, colour in each(
        browser, ".certs-table tbody tr .cert-acme",
        "[e.closest('tr').dataset.host, e.innerText, getComputedStyle(e).color]")}
    assert cells["app.example.com"][0] == "issued"
    assert cells["new.example.com"][0] == "pending: waiting for the issuer"
    assert cells["down.example.com"][0].startswith(
        "failed (attempt 2, retry in 10 min): validation failed")
    assert cells["down.example.com"][1] != cells["app.example.com"][1]
    assert severe_logs(browser) == []

