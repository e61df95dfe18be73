"""A transfer coding before chunked: not implemented, never forwarded."""

status = 501
