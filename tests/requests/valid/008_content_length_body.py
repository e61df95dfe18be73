"""A Content-Length body is handed out as it arrives, framing removed."""

requests = [
    {"method": b"POST", "target": b"/submit", "host": b"example.com", "content_length": 13,
     "body": b"hello, world!",
     "headers": [(b"Host", b"example.com"), (b"Content-Type", b"text/plain"),
                 (b"Content-Length", b"13")]},
]
