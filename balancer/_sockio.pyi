"""Types of the C extension balancer/_sockio.c (built beside the mypyc modules)."""

from socket import socket

BUFFER_SIZE: int

def recv(sock: socket, size: int, /) -> bytes | None: ...
def send(sock: socket, data: bytes | memoryview, /) -> int: ...
