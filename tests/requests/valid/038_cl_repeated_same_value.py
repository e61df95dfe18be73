"""Content-Length twice with the same value (leading zeros aside), then a field
and a pipelined GET: merged into one (RFC 9110 §8.6; HAProxy merges them), in
the first's place."""

requests = [
    {"method": b"POST", "target": b"/", "host": b"example.com", "content_length": 5,
     "body": b"hello",
     "headers": [(b"Host", b"example.com"), (b"Content-Length", b"5"), (b"X-After", b"a")]},
    {"method": b"GET", "target": b"/next", "host": b"example.com",
     "headers": [(b"Host", b"example.com")]},
]
