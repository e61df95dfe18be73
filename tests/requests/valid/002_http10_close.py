"""HTTP/1.0 without Host and without keep-alive: the connection closes after it."""

requests = [
    {"method": b"GET", "target": b"/index.html", "version": b"1.0", "host": b"",
     "keep_alive": False, "headers": [(b"User-Agent", b"ab/2.3")]},
]
