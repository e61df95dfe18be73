"""Three pipelined requests for three hosts, one with a body: each is parsed on its own."""

requests = [
    {"method": b"GET", "target": b"/a", "host": b"a.example", "headers": [(b"Host", b"a.example")]},
    {"method": b"POST", "target": b"/b", "host": b"b.example", "content_length": 5,
     "body": b"hello", "headers": [(b"Host", b"b.example"), (b"Content-Length", b"5")]},
    {"method": b"GET", "target": b"/c", "host": b"c.example", "headers": [(b"Host", b"c.example")]},
]
