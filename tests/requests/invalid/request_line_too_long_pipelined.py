"""An over-long line in the second of two pipelined requests (the feed-level count
used to miss it when both came in one read)."""

status = 414
