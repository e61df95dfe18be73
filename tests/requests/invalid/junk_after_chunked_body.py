"""Bytes after the last chunk that are no request (keep-alive connection)."""

status = 400
