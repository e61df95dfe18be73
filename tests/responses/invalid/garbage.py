"""Not a status line at all."""

status = 502
