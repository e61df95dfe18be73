"""Two Host fields with the same value."""

status = 400
