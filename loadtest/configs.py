"""Configuration files for the third-party processes, generated into the run dir.

Every proxy is given one core's worth of workers (nginx ``worker_processes 1``,
haproxy ``nbthread 1``) because the balancer and the threaded baseline run one
process each: the comparison is per process, on equal timeouts and backlogs.
"""

from __future__ import annotations

import os
from pathlib import Path

BACKLOG = 65535  # as the balancer (balancer.accepting.BACKLOG); the kernel caps it at somaxconn
KEEPALIVE_TIMEOUT = 75


def _user_line() -> str:
    # As root nginx would switch its workers to 'nobody', who cannot read a
    # private run directory; keep them as the invoking user instead.
    return "user root;\n" if os.geteuid() == 0 else ""


def _nginx_common(dir: Path, connections: int, nofile: int) -> str:
    tmp = dir / "tmp"
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / name).mkdir(parents=True, exist_ok=True)
    return (
        f"{_user_line()}worker_processes 1;\nworker_rlimit_nofile {nofile};\n"
        f"pid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n"
        f"events {{ worker_connections {connections}; multi_accept on; }}\n"
        "http {\n  access_log off;\n"
        f"  client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n"
        f"  fastcgi_temp_path {tmp}/fastcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n"
        f"  scgi_temp_path {tmp}/scgi;\n"
        f"  keepalive_timeout {KEEPALIVE_TIMEOUT}s;\n  keepalive_requests 1000000;\n"
    )


def nginx_backend(dir: Path, port: int, page: bytes, nofile: int) -> str:
    """nginx serving `page` for every path on 127.0.0.1:`port`; writes the docroot."""
    www = dir / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / "index.html").write_bytes(page)
    connections = max(1024, nofile - 500)
    return _nginx_common(dir, connections, nofile) + (
        "  default_type text/html;\n  charset utf-8;\n  sendfile on;\n"
        "  open_file_cache max=16 inactive=60s;\n  open_file_cache_valid 60s;\n"
        f"  server {{\n    listen 127.0.0.1:{port} backlog={BACKLOG};\n    root {www};\n"
        "    location / { try_files /index.html =404; }\n  }\n}\n"
    )


def nginx_proxy(dir: Path, port: int, backends: list[str], nofile: int) -> str:
    """nginx as a keep-alive reverse proxy in front of `backends` (round robin)."""
    servers = "".join(f"    server {addr} max_fails=0;\n" for addr in backends)
    connections = max(1024, nofile - 500)
    return _nginx_common(dir, connections, nofile) + (
        f"  upstream backends {{\n{servers}    keepalive 1024;\n  }}\n"
        f"  server {{\n    listen 127.0.0.1:{port} backlog={BACKLOG};\n"
        "    location / {\n      proxy_pass http://backends;\n"
        "      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n"
        "      proxy_set_header Host $host;\n"
        "      proxy_next_upstream error timeout;\n      proxy_connect_timeout 5s;\n"
        "      proxy_read_timeout 60s;\n      proxy_buffering on;\n    }\n  }\n}\n"
    )


def haproxy(port: int, backends: list[str], nofile: int, maxconn: int, threads: int = 1) -> str:
    """HAProxy as a keep-alive reverse proxy in front of `backends` (round robin),
    with `threads` threads (``nbthread``)."""
    servers = "".join(f"    server b{i} {addr}\n" for i, addr in enumerate(backends))
    return (
        "global\n"
        f"    maxconn {maxconn}\n    ulimit-n {nofile}\n    nbthread {threads}\n"
        "defaults\n    mode http\n    option http-keep-alive\n"
        "    timeout connect 5s\n    timeout client 75s\n    timeout server 60s\n"
        f"    timeout http-keep-alive {KEEPALIVE_TIMEOUT}s\n    timeout http-request 10s\n"
        "    retries 3\n    option redispatch\n"
        f"frontend fe\n    bind 127.0.0.1:{port}\n    maxconn {maxconn}\n"
        f"    backlog {BACKLOG}\n    default_backend be\n"
        f"backend be\n    balance roundrobin\n    http-reuse always\n{servers}"
    )
