"""An HTTP/1.0 client cannot take a 100 Continue: its expectation is ignored (RFC 9110 10.1.1)."""

requests = [
    {"method": b"POST", "target": b"/form", "version": b"1.0", "host": b"example.com",
     "keep_alive": False, "content_length": 3, "body": b"abc",
     "headers": [(b"Host", b"example.com"), (b"Expect", b"100-continue"),
                 (b"Content-Length", b"3")]},
]
