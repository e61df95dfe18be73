"""A target that is neither origin-form, absolute-form nor *."""

status = 400
