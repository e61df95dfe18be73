"""Percent-encoded octets are passed on as received (no decoding, no normalisation)."""

requests = [
    {"method": b"GET", "target": b"/caf%C3%A9/%2e%2e/x%20y?k=%26v%3D", "host": b"example.com",
     "headers": [(b"Host", b"example.com")]},
]
