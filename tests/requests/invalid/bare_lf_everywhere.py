"""Bare LF line endings throughout."""

status = 400
