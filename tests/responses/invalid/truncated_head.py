"""The backend closed inside the head."""

eof = True
status = 502
