"""Empty lines before an over-long request line (they used to switch the line check off)."""

status = 414
