"""An absolute-form target whose host is ``*`` (a reg-name: RFC 3986 §3.2.2,
``*`` is a sub-delim), not the asterisk-form of OPTIONS (RFC 9112 §3.2.4,
the target ``*`` alone): the host routes it, its empty path is ``/``
(RFC 9112 §3.2.1). The framing fuzzer made it (seed 11, case 1815)."""

requests = [
    {"method": b"POST", "target": b"/", "host": b"*", "content_length": 3,
     "headers": [(b"Host", b"app.test"), (b"Content-Length", b"3")], "body": b"abc"},
]
