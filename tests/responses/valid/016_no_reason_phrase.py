"""A status line without a reason phrase, nor the space before it: the client
gets the space (RFC 9112 §4: status-code SP [ reason-phrase ])."""

responses = [
    {"status": 404, "status_line": b"HTTP/1.1 404 ", "content_length": 0,
     "headers": [(b"Content-Length", b"0")]},
]
