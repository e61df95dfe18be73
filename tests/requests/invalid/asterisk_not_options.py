"""The asterisk-form target with a method other than OPTIONS (RFC 9112 3.2.4)."""

status = 400
