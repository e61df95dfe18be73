"""``curl --http2 -d hello http://...``: an h2c upgrade (dropped) with a
Content-Length body; llhttp ends the message at the head (it would read the
body as HTTP/2), so a new parser reads the body, and the request after it
(before 2026-12-07 a 400, "Upgrade request with a body")."""

requests = [
    {"method": b"POST", "target": b"/upload", "host": b"example.com", "content_length": 5,
     "body": b"hello", "connection_tokens": frozenset({b"upgrade", b"http2-settings"}),
     "headers": [(b"Host", b"example.com"), (b"User-Agent", b"curl/7.88.1"),
                 (b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", b"h2c"),
                 (b"HTTP2-Settings", b"AAMAAABkAAQCAAAAAAIAAAAA"),
                 (b"Content-Length", b"5")]},
    {"method": b"GET", "target": b"/next", "host": b"example.com",
     "headers": [(b"Host", b"example.com")]},
]
