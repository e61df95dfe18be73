"""A status below 100 (it used to be taken for an interim response)."""

status = 502
