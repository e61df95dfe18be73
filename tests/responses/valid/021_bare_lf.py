"""Bare LF line endings: read as CRLF (RFC 9112 §2.2, as HAProxy and nginx);
the connection is not reused after it."""

responses = [
    {"status": 200, "status_line": b"HTTP/1.1 200 OK", "content_length": 0, "keep_alive": False,
     "headers": [(b"Content-Length", b"0")]},
]
