"""The backend closed after an interim response."""

eof = True
status = 502
