"""Connection options are collected (for hop-by-hop removal); close ends keep-alive."""

responses = [
    {"status": 500, "status_line": b"HTTP/1.1 500 Internal Server Error", "keep_alive": False,
     "content_length": 5, "body": b"oops!", "connection_tokens": frozenset({b"close", b"x-debug"}),
     "headers": [(b"Connection", b"close, X-Debug"), (b"X-Debug", b"on"),
                 (b"Content-Length", b"5")]},
]
