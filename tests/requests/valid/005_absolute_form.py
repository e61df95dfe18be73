"""Absolute-form target: the host comes from the target, not from Host (RFC 9112 3.2.2)."""

requests = [
    {"method": b"GET", "target": b"/path/to?q=1", "host": b"Example.COM:8080",
     "headers": [(b"Host", b"other.example")]},
]
