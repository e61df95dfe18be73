"""ESC in a value (terminal injection)."""

status = 400
