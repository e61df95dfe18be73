"""Other registered methods pass through; their bodies are framed the same way."""

requests = [
    {"method": b"PUT", "target": b"/r", "host": b"example.com", "content_length": 2,
     "body": b"{}", "headers": [(b"Host", b"example.com"), (b"Content-Length", b"2")]},
    {"method": b"PATCH", "target": b"/r", "host": b"example.com", "content_length": 2,
     "body": b"[]", "headers": [(b"Host", b"example.com"), (b"Content-Length", b"2")]},
    {"method": b"PROPFIND", "target": b"/dav", "host": b"example.com",
     "headers": [(b"Host", b"example.com")]},
    {"method": b"TRACE", "target": b"/", "host": b"example.com",
     "headers": [(b"Host", b"example.com")]},
]
