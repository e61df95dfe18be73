"""A chunk size line ended by a bare LF."""

status = 400
