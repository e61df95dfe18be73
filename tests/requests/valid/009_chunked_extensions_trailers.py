"""Chunked body with chunk extensions and trailer fields: extensions and trailers are dropped."""

requests = [
    {"method": b"POST", "target": b"/upload", "host": b"example.com", "chunked": True,
     "body": b"hello, world",
     "headers": [(b"Host", b"example.com"), (b"Transfer-Encoding", b"chunked")]},
]
