"""A status line without a reason phrase is kept as it is."""

responses = [
    {"status": 404, "status_line": b"HTTP/1.1 404", "content_length": 0,
     "headers": [(b"Content-Length", b"0")]},
]
