"""Types of the C extension balancer/_sockio.c (built beside the mypyc modules)."""

from _socket import socket
from typing import Any

BUFFER_SIZE: int

def recv(sock: socket, size: int, /) -> bytes | None: ...
def send(sock: socket, data: bytes | memoryview, /) -> int: ...
def accept(listener: socket, proto: int, /) -> tuple[socket, Any] | None: ...
