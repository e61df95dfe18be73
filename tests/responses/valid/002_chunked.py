"""A chunked body: extensions and trailers are dropped, framing removed."""

responses = [
    {"status": 200, "status_line": b"HTTP/1.1 200 OK", "chunked": True, "body": b"hello, world",
     "headers": [(b"Transfer-Encoding", b"chunked")]},
]
