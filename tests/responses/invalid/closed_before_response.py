"""The backend closed without a byte."""

eof = True
status = 502
