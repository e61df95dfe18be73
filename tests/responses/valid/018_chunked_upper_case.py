"""Transfer codings are case-insensitive; chunk sizes are hex."""

responses = [
    {"status": 200, "status_line": b"HTTP/1.1 200 OK", "chunked": True, "body": b"0123456789",
     "headers": [(b"Transfer-Encoding", b"CHUNKED")]},
]
