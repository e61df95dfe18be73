"""Connection: close on HTTP/1.1: the request is the last one, what follows is ignored."""

requests = [
    {"method": b"GET", "target": b"/", "host": b"example.com", "keep_alive": False,
     "connection_tokens": frozenset({b"close"}),
     "headers": [(b"Host", b"example.com"), (b"Connection", b"close")]},
]
