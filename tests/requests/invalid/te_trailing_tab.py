"""chunked followed by a tab: llhttp does not see chunked, so it must not pass."""

status = 400
