"""Content-Length: 0, then a pipelined DELETE."""

requests = [
    {"method": b"POST", "target": b"/empty", "host": b"example.com", "content_length": 0,
     "headers": [(b"Host", b"example.com"), (b"Content-Length", b"0")]},
    {"method": b"DELETE", "target": b"/item/7", "host": b"example.com",
     "headers": [(b"Host", b"example.com")]},
]
