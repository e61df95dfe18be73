"""After a closing request, not even an over-long line is looked at (the head limits used
to turn it into a 414 when it came in a later read)."""

requests = [
    {"method": b"GET", "target": b"/", "host": b"example.com", "keep_alive": False,
     "connection_tokens": frozenset({b"close"}),
     "headers": [(b"Host", b"example.com"), (b"Connection", b"close")]},
]
