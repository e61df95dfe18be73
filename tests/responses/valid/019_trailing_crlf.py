"""A stray CRLF after a complete response is harmless (the connection stays reusable)."""

responses = [
    {"status": 200, "status_line": b"HTTP/1.1 200 OK", "content_length": 2, "body": b"ok",
     "headers": [(b"Content-Length", b"2")]},
]
