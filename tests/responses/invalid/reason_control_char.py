"""A control byte (DEL) in the reason phrase (RFC 9112 §4: HTAB, SP, VCHAR, obs-text)."""

status = 502
