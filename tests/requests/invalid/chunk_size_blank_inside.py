"""A blank between the digits of a chunk size (blanks only after it: nginx, for one, reads 1)."""

status = 400
