"""Connection options from every Connection field, lower-cased (hop-by-hop names)."""

requests = [
    {"method": b"GET", "target": b"/", "host": b"example.com",
     "connection_tokens": frozenset({b"keep-alive", b"x-custom", b"te"}),
     "headers": [(b"Host", b"example.com"), (b"Connection", b"keep-alive, X-Custom"),
                 (b"Connection", b"TE"), (b"X-Custom", b"1"), (b"TE", b"trailers")]},
]
