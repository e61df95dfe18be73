"""Two Host fields (which one would a backend route on?)."""

status = 400
