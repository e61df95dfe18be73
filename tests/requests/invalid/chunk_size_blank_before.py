"""A blank before a chunk size (blanks are taken after it only)."""

status = 400
