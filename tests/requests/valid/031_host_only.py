"""Heads whose only special field is Host (the parser's shortcut): trailing
blanks leave the host, and keep-alive follows the version alone."""

requests = [
    {"method": b"GET", "target": b"/", "host": b"example.com",
     "headers": [(b"Host", b"example.com \t"), (b"Accept", b"*/*")]},
    {"method": b"GET", "target": b"/old", "version": b"1.0", "host": b"example.com",
     "keep_alive": False, "headers": [(b"Host", b"example.com")]},
]
