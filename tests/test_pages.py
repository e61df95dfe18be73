import os
import re
from html.parser import HTMLParser

import pytest

from balancer.pages import HTML, PAGE_STATUS, Page, PageError, Pages

SPEC_PAGES = {
    "unknown": 404, "no-hosts": 503, "timeout": 504, "bad-gateway": 502, "maintenance": 503,
    "busy": 503, "bad-request": 400, "uri-too-long": 414, "headers-too-large": 431,
    "payload-too-large": 413, "request-timeout": 408, "not-implemented": 501,
    "version-not-supported": 505, "expectation-failed": 417, "misdirected-request": 421,
}


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []
        self.urls = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_title = tag == "title"
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def test_page_status_table():
    assert PAGE_STATUS == SPEC_PAGES
    assert Pages.names() == tuple(SPEC_PAGES)


@pytest.mark.parametrize("name", sorted(SPEC_PAGES))
def test_builtin_page_is_small_self_contained_html(name):
    page = Pages.load().get(name)
    assert page == Page(name, SPEC_PAGES[name], page.body, HTML)
    text = page.body.decode("utf-8")
    assert text.startswith("<!doctype html>")
    assert len(page.body) < 2048
    parsed = _Collector()
    parsed.feed(text)
    assert {"html", "head", "title", "body", "h1"} <= set(parsed.tags)
    assert parsed.urls == [] and "url(" not in text and "@import" not in text
    assert parsed.title.startswith(str(page.status))


def test_builtin_pages_match_the_files_on_disk():
    here = os.path.join(os.path.dirname(__file__), "..", "balancer", "pages")
    files = {re.sub(r"\.html$", "", f) for f in os.listdir(here) if f.endswith(".html")}
    assert files == set(SPEC_PAGES)


def test_get_unknown_name_is_a_key_error():
    pages = Pages.load()
    with pytest.raises(KeyError, match="unknown page 'nope'"):
        pages.get("nope")
    assert "unknown" in pages and "nope" not in pages


def test_override_replaces_only_that_page(tmp_path):
    (tmp_path / "maintenance.html").write_bytes("<h1>Back soon ✓</h1>".encode())
    (tmp_path / "style.css").write_text("ignored: not a page")
    builtin = Pages.load()
    pages = Pages.load(str(tmp_path))
    assert pages.get("maintenance").body == "<h1>Back soon ✓</h1>".encode()
    assert pages.get("maintenance").status == 503
    assert pages.get("unknown") == builtin.get("unknown")


def test_overrides_are_read_once_at_load(tmp_path):
    path = tmp_path / "unknown.html"
    path.write_text("<p>first</p>")
    pages = Pages.load(str(tmp_path))
    path.write_text("<p>second</p>")
    assert pages.get("unknown").body == b"<p>first</p>"


@pytest.mark.parametrize(
    ("filename", "content", "problem"),
    [
        ("unknown.html", b"", "is empty"),
        ("unknown.html", b"  \n", "is empty"),
        ("timeout.html", b"<p>\xff\xfe</p>", "not valid UTF-8"),
        ("unkown.html", b"<p>typo</p>", "not a page name"),
    ],
)
def test_bad_override_names_the_file(tmp_path, filename, content, problem):
    (tmp_path / filename).write_bytes(content)
    with pytest.raises(PageError) as info:
        Pages.load(str(tmp_path))
    assert str(tmp_path / filename) in str(info.value)
    assert problem in str(info.value)


def test_unreadable_override_names_the_file(tmp_path):
    (tmp_path / "busy.html").mkdir()  # a directory cannot be read as a page
    with pytest.raises(PageError, match=re.escape(str(tmp_path / "busy.html")) + ".*cannot read"):
        Pages.load(str(tmp_path))


def test_missing_pages_dir(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(PageError, match=f"pages_dir {re.escape(missing)}: cannot list"):
        Pages.load(missing)


def test_pages_must_be_complete():
    with pytest.raises(PageError, match="pages missing: "):
        Pages({"unknown": Pages.load().get("unknown")})
