"""The head ended by a bare LF."""

status = 400
