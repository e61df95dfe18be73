"""Digits with an underscore (Python's int() would take it)."""

status = 400
