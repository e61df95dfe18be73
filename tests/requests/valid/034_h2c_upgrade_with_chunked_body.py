"""An h2c upgrade (no upgrade through the balancer: the token is dropped) with a
chunked body: the body is read as any chunked body, and the request after it
(before 2026-12-07 a 400, "Upgrade request with a body")."""

requests = [
    {"method": b"POST", "target": b"/chat", "host": b"example.com", "chunked": True,
     "body": b"hello", "connection_tokens": frozenset({b"upgrade"}),
     "headers": [(b"Host", b"example.com"), (b"Connection", b"Upgrade"),
                 (b"Upgrade", b"h2c"), (b"Transfer-Encoding", b"chunked")]},
    {"method": b"GET", "target": b"/next", "host": b"example.com",
     "headers": [(b"Host", b"example.com")]},
]
