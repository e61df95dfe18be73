"""An interim 100 Continue, then the final response."""

responses = [
    {"status": 100, "status_line": b"HTTP/1.1 100 Continue", "no_body": True, "headers": []},
    {"status": 200, "status_line": b"HTTP/1.1 200 OK", "content_length": 7, "body": b"stored!",
     "headers": [(b"Content-Length", b"7")]},
]
