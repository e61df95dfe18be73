"""The smallest useful HTTP/1.1 request."""

requests = [
    {"method": b"GET", "target": b"/", "host": b"example.com",
     "headers": [(b"Host", b"example.com"), (b"User-Agent", b"corpus/1.0"), (b"Accept", b"*/*")]},
]
