"""CONNECT: this proxy does not tunnel arbitrary TCP."""

status = 501
