"""Chunk data not followed by CRLF (the size was a lie)."""

status = 400
