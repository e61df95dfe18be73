"""An HTTP/1.0 request's Upgrade is ignored (RFC 9110 §7.8), so it may have a
body; without keep-alive nothing after it is read (before 2026-12-07 a 400,
"Upgrade request with a body")."""

requests = [
    {"method": b"POST", "target": b"/form", "host": b"example.com", "version": b"1.0",
     "content_length": 5, "body": b"hello", "keep_alive": False,
     "connection_tokens": frozenset({b"upgrade"}),
     "headers": [(b"Host", b"example.com"), (b"Connection", b"Upgrade"),
                 (b"Upgrade", b"websocket"), (b"Content-Length", b"5")]},
]
