"""An HTTP/1.0 keep-alive response with a length."""

responses = [
    {"status": 200, "status_line": b"HTTP/1.1 200 OK", "content_length": 2, "body": b"ok",
     "connection_tokens": frozenset({b"keep-alive"}),
     "headers": [(b"Connection", b"keep-alive"), (b"Content-Length", b"2")]},
]
