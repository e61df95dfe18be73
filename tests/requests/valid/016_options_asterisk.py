"""OPTIONS with the asterisk-form target."""

requests = [
    {"method": b"OPTIONS", "target": b"*", "host": b"example.com",
     "headers": [(b"Host", b"example.com")]},
]
