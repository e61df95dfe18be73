"""304 with the Content-Length of the full representation: no body follows."""

responses = [
    {"status": 304, "status_line": b"HTTP/1.1 304 Not Modified", "no_body": True,
     "content_length": 1234, "headers": [(b"Content-Length", b"1234")]},
]
