"""identity is not a transfer coding any more."""

status = 501
