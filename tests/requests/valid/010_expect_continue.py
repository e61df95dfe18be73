"""Expect: 100-continue is recognised; the body follows once the client is told to go on."""

requests = [
    {"method": b"PUT", "target": b"/file", "host": b"example.com", "content_length": 4,
     "expect_continue": True, "body": b"data",
     "headers": [(b"Host", b"example.com"), (b"Content-Length", b"4"),
                 (b"Expect", b"100-continue")]},
]
