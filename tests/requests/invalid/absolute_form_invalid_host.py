"""The target's authority routes an absolute-form request, but its Host must be
valid all the same (RFC 9112 §3.2)."""

status = 400
