"""A close-delimited response whose body is empty."""

eof = True
responses = [
    {"status": 200, "status_line": b"HTTP/1.1 200 OK", "keep_alive": False,
     "connection_tokens": frozenset({b"close"}), "headers": [(b"Connection", b"close")]},
]
