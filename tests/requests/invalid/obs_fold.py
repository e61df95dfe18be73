"""obs-fold: a field continued on the next line (RFC 9112 5.2)."""

status = 400
