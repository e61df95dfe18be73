"""A transfer coding without chunked."""

eof = True
status = 502
