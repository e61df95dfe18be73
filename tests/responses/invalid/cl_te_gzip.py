"""Content-Length beside a Transfer-Encoding that is not chunked alone."""

status = 502
