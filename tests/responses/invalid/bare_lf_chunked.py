"""Bare LF line endings in chunk framing too (only a head is read with them)."""

status = 502
