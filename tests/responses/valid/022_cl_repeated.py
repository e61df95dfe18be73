"""Content-Length twice with one value: merged (RFC 9110 §8.6, as HAProxy); the
connection is not reused after it."""

responses = [
    {"status": 200, "status_line": b"HTTP/1.1 200 OK", "content_length": 3, "body": b"abc",
     "keep_alive": False, "headers": [(b"Content-Length", b"3")]},
]
