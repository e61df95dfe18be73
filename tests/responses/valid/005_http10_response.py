"""An HTTP/1.0 response: close-delimited; the status line is rewritten to HTTP/1.1."""

eof = True
responses = [
    {"status": 200, "status_line": b"HTTP/1.1 200 OK", "keep_alive": False, "body": b"body",
     "headers": [(b"Server", b"old")]},
]
