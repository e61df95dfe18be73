"""HEAD: no body either way."""

requests = [
    {"method": b"HEAD", "target": b"/report.pdf", "host": b"example.com",
     "headers": [(b"Host", b"example.com")]},
]
