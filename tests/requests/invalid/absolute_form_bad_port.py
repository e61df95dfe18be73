"""A port that is not digits in an absolute-form target (RFC 3986 §3.2.3)."""

status = 400
