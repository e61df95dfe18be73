"""A fragment in an absolute-form target (RFC 9112 3.2.2: absolute-URI has none)."""

status = 400
