"""Absolute-form without a path: "/" is the path, the query stays in the target.

Regression: the query used to stay in the host ("example.com?x=1").
"""

requests = [
    {"method": b"GET", "target": b"/?x=1", "host": b"example.com",
     "headers": [(b"Host", b"example.com")]},
    {"method": b"GET", "target": b"/", "host": b"example.org",
     "headers": [(b"Host", b"example.org")]},
]
