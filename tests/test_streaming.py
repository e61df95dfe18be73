"""50 MB bodies stream through the balancer without being held in memory."""

from __future__ import annotations

import hashlib
import http.client
import json

import pytest

from tests.support import Backend, Balancer

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

SIZE = 50 * 1024 * 1024
BLOCK = bytes(range(256)) * 256  # 64 KiB


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not found")


@pytest.fixture
def setup(tmp_path):
    backend = Backend("a")
    bal = Balancer(tmp_path, {"app.test": {"action": "proxy", "backends": [backend.address]}})
    yield bal, backend
    bal.stop()
    backend.stop()


def blocks(total: int):
    sent = 0
    while sent < total:
        piece = BLOCK[: min(len(BLOCK), total - sent)]
        sent += len(piece)
        yield piece


def expected_sha(total: int) -> str:
    digest = hashlib.sha256()
    for piece in blocks(total):
        digest.update(piece)
    return digest.hexdigest()


def test_50mb_upload_and_download_keep_rss_flat(setup):
    bal, _ = setup
    pid = bal.api("GET", "/api/v1/info")[1]["processes"][0]["pid"]  # the worker
    conn = http.client.HTTPConnection("127.0.0.1", bal.port, timeout=60)
    conn.request("GET", "/warm", headers={"Host": "app.test"})
    conn.getresponse().read()
    baseline = rss_kib(pid)

    conn.request("POST", "/upload", body=blocks(SIZE), encode_chunked=True,
                 headers={"Host": "app.test", "Transfer-Encoding": "chunked"})
    echoed = json.loads(conn.getresponse().read())
    assert echoed["body_len"] == SIZE and echoed["body_sha"] == expected_sha(SIZE)

    conn.request("PUT", "/upload", body=blocks(SIZE),
                 headers={"Host": "app.test", "Content-Length": str(SIZE)})
    echoed = json.loads(conn.getresponse().read())
    assert echoed["body_len"] == SIZE and echoed["body_sha"] == expected_sha(SIZE)

    conn.request("GET", f"/big?n={SIZE}", headers={"Host": "app.test"})
    response = conn.getresponse()
    received = 0
    while chunk := response.read(1 << 20):
        received += len(chunk)
    assert received == SIZE
    conn.close()

    growth_mib = (rss_kib(pid, "VmHWM") - baseline) / 1024
    assert growth_mib < 20, f"balancer peak RSS grew by {growth_mib:.1f} MiB"
