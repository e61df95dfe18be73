"""An Expect list's empty elements are ignored (RFC 9110 §5.6.1.2): this is
100-continue."""

requests = [
    {"method": b"PUT", "target": b"/file", "host": b"example.com", "content_length": 4,
     "expect_continue": True, "body": b"data",
     "headers": [(b"Host", b"example.com"), (b"Content-Length", b"4"),
                 (b"Expect", b", 100-continue,")]},
]
