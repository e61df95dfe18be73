"""An unknown minor version of HTTP/1: read as HTTP/1.1 (RFC 9110 §2.5, as nginx
and HAProxy; before 2026-12-07 a 400), then a request after it."""

requests = [
    {"method": b"GET", "target": b"/", "host": b"example.com", "version": b"1.1",
     "headers": [(b"Host", b"example.com")]},
    {"method": b"GET", "target": b"/next", "host": b"example.com",
     "headers": [(b"Host", b"example.com")]},
]
