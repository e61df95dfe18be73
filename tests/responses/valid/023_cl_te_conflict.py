"""Content-Length and Transfer-Encoding together: the latter frames, the former
goes (RFC 9112 §6.3, as HAProxy); the connection is not reused after it."""

responses = [
    {"status": 200, "status_line": b"HTTP/1.1 200 OK", "chunked": True, "keep_alive": False,
     "headers": [(b"Transfer-Encoding", b"chunked")]},
]
