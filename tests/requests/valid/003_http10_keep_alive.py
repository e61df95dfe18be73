"""HTTP/1.0 keep-alive: two requests on one connection."""

requests = [
    {"method": b"GET", "target": b"/", "version": b"1.0", "host": b"example.com",
     "connection_tokens": frozenset({b"keep-alive"}),
     "headers": [(b"Host", b"example.com"), (b"Connection", b"keep-alive")]},
    {"method": b"GET", "target": b"/next", "version": b"1.0", "host": b"example.com",
     "connection_tokens": frozenset({b"keep-alive"}),
     "headers": [(b"Host", b"example.com"), (b"Connection", b"Keep-Alive")]},
]
