"""A request line ended by a bare CR."""

status = 400
