"""Proxy-Connection, read by llhttp as Connection: it keeps an HTTP/1.0 request
alive and closes after an HTTP/1.1 one (it is never forwarded, and a head with it
is not read by the parser's shortcut for a head whose only special field is Host)."""

requests = [
    {"method": b"GET", "target": b"/", "version": b"1.0", "host": b"example.com",
     "headers": [(b"Host", b"example.com"), (b"Proxy-Connection", b"keep-alive")]},
    {"method": b"GET", "target": b"/next", "host": b"example.com", "keep_alive": False,
     "headers": [(b"Host", b"example.com"), (b"Proxy-Connection", b"close")]},
]
