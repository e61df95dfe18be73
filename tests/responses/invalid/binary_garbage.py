"""Binary garbage."""

status = 502
