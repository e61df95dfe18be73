"""The backend closed before Content-Length bytes came."""

eof = True
status = 502
