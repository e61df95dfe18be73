"""204 with a Content-Length still has no body: nothing is waited for."""

responses = [
    {"status": 204, "status_line": b"HTTP/1.1 204 No Content", "no_body": True,
     "content_length": 10, "headers": [(b"Content-Length", b"10")]},
]
