"""Bare LF line endings."""

status = 502
