"""No Content-Length and no chunked: the body runs until the backend closes (feed_eof)."""

eof = True
responses = [
    {"status": 200, "status_line": b"HTTP/1.1 200 OK", "keep_alive": False,
     "connection_tokens": frozenset({b"close"}),
     "body": b"no length: the body ends when the backend closes",
     "headers": [(b"Content-Type", b"text/plain"), (b"Connection", b"close")]},
]
