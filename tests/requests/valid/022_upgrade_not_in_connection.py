"""Upgrade without the "upgrade" connection option is only informational: no tunnel."""

requests = [
    {"method": b"GET", "target": b"/chat", "host": b"example.com",
     "connection_tokens": frozenset({b"keep-alive"}),
     "headers": [(b"Host", b"example.com"), (b"Upgrade", b"websocket"),
                 (b"Connection", b"keep-alive")]},
    {"method": b"GET", "target": b"/next", "host": b"example.com",
     "headers": [(b"Host", b"example.com")]},
]
