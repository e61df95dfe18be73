"""An unknown minor version."""

status = 400
