"""An absolute-form target whose host is ``*``: a reg-name by RFC 3986 §3.2.2
(``*`` is a sub-delim), but no host; not the asterisk-form of OPTIONS either
(RFC 9112 §3.2.4: the target ``*`` alone). nginx refuses it; it was forwarded as
``/`` with ``Host: *`` (the framing fuzzer made it: seed 11, case 1815)."""

status = 400
