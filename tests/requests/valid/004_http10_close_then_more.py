"""Bytes after a request that closes the connection are ignored (RFC 9112 9.6).

Regression: they used to turn the whole exchange into a 400, so the first
request was never answered.
"""

requests = [
    {"method": b"GET", "target": b"/", "version": b"1.0", "keep_alive": False, "headers": []},
]
