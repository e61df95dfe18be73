"""A status above 599 (llhttp takes any three digits)."""

status = 502
