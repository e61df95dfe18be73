"""Absolute-form authorities RFC 3986 allows and nginx and HAProxy forward: an
IPv6 literal with a port, an IPvFuture literal, a name with its trailing dot and
an empty port (RFC 3986 §3.2.3: ``port = *DIGIT``)."""

requests = [
    {"method": b"GET", "target": b"/p", "host": b"[::1]:8080",
     "headers": [(b"Host", b"app.test")]},
    {"method": b"GET", "target": b"/q", "host": b"[v1.x]",
     "headers": [(b"Host", b"app.test")]},
    {"method": b"GET", "target": b"/r", "host": b"app.test.:",
     "headers": [(b"Host", b"app.test")]},
]
