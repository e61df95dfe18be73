"""304 never has a body."""

responses = [
    {"status": 304, "status_line": b"HTTP/1.1 304 Not Modified", "no_body": True,
     "headers": [(b"ETag", b'"abc"')]},
]
