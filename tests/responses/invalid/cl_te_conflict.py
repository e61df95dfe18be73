"""Content-Length and Transfer-Encoding together."""

status = 502
