"""chunked followed by a tab: llhttp reads such a body to the connection's close
(bug: the head was taken as chunked all the same, and the client got the chunk
framing as data in chunks of its own)."""

status = 502
