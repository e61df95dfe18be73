"""Exactly max_headers (100, the default) header fields are accepted."""

requests = [
    {"method": b"GET", "target": b"/", "host": b"example.com",
     "headers": [(b"Host", b"example.com")]
     + [(b"X-Header-%02d" % i, b"value-%02d" % i) for i in range(1, 100)]},
]
