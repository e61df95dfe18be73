"""204 never has a body."""

responses = [
    {"status": 204, "status_line": b"HTTP/1.1 204 No Content", "no_body": True,
     "headers": [(b"X-A", b"1")]},
]
