"""The query string is part of the target, untouched."""

requests = [
    {"method": b"GET", "target": b"/search?q=a+b&lang=en&empty=&flag", "host": b"example.com",
     "headers": [(b"Host", b"example.com")]},
]
