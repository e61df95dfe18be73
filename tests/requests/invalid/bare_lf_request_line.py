"""A request line ended by a bare LF."""

status = 400
