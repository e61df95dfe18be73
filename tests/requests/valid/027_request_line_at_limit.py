"""A request line of exactly max_request_line (8192, the default) bytes is accepted."""

requests = [
    {"method": b"GET", "target": b"/" + b"a" * 8178, "host": b"example.com",
     "headers": [(b"Host", b"example.com")]},
]
