"""Empty lines before a request line are ignored (RFC 9112 2.2), also between requests."""

requests = [
    {"method": b"GET", "target": b"/", "host": b"example.com",
     "headers": [(b"Host", b"example.com")]},
    {"method": b"GET", "target": b"/2", "host": b"example.com",
     "headers": [(b"Host", b"example.com")]},
]
