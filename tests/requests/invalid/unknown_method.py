"""A method llhttp does not know."""

status = 400
