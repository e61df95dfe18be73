"""A chunk size line (its extension) over the head limit, 64 KiB, after a chunk:
refused however it is split (bug: one that came in a read with body bytes went
on, re-chunked)."""

status = 502
