"""A Content-Length body."""

responses = [
    {"status": 200, "status_line": b"HTTP/1.1 200 OK", "content_length": 12,
     "body": b"hello, world",
     "headers": [(b"Content-Type", b"text/plain"), (b"Content-Length", b"12")]},
]
