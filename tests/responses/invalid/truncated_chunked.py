"""The backend closed inside a chunk."""

eof = True
status = 502
