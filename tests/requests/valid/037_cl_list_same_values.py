"""Content-Length as a list of one number (RFC 9112 §6.3: processed with that
value; HAProxy merges it): one Content-Length, written plainly, goes on."""

requests = [
    {"method": b"POST", "target": b"/", "host": b"example.com", "content_length": 5,
     "body": b"hello",
     "headers": [(b"Host", b"example.com"), (b"Content-Length", b"5")]},
]
