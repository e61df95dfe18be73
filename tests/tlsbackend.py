"""Scripted HTTPS backends for tests: the echo backend of `tests.support` over TLS,
recording the SNI name of every handshake and counting connections."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from tests.support import Backend, BackendServer, EchoHandler
from tests.tlsca import TestCA


def server_context(ca: TestCA, tmp: Path, *names: str) -> ssl.SSLContext:
    """A server context with a certificate from `ca` for `names`."""
    chain, key = ca.issue(*names)
    path = tmp / f"server-{names[0].replace('*', '_')}-{id(ca)}.pem"
    path.write_text(key + chain)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(path))
    return context


class TLSBackendServer(BackendServer):
    """The echo backend's server over TLS; the handshake runs in the handler thread."""

    context: ssl.SSLContext

    def get_request(self) -> tuple[Any, Any]:
        sock, address = self.socket.accept()
        self.owner.accepted += 1  # type: ignore[attr-defined]
        return self.context.wrap_socket(sock, server_side=True,
                                        do_handshake_on_connect=False), address

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(5)
            request.do_handshake()
        except (OSError, ssl.SSLError):
            self.owner.failed_handshakes += 1  # type: ignore[attr-defined]
            return
        self.owner.resumed.append(request.session_reused)  # type: ignore[attr-defined]
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away: nothing to report


class TLSEchoHandler(EchoHandler):
    """The echo handler, plus misbehaviour a TLS backend's pool must survive."""

    def act_stray(self, query: dict[str, str], head: bool) -> None:
        """Answer, then (the connection kept alive) send a stray 408 while it idles."""
        self.reply(200, self.describe(), head)
        self.wfile.flush()
        connection = self.connection

        def stray() -> None:
            time.sleep(float(query.get("after", "0.2")))
            with contextlib.suppress(OSError):
                connection.sendall(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n"
                                   b"Connection: close\r\n\r\n")
                self.server.owner.strays += 1  # type: ignore[attr-defined]

        threading.Thread(target=stray, daemon=True).start()

    def act_cut(self, query: dict[str, str], head: bool) -> None:
        """Promise a body, send half of it, and close the connection."""
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 500)
        self.wfile.flush()
        time.sleep(float(query.get("after", "0.3")))  # the half that came is relayed first
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


class TLSBackend(Backend):
    """An HTTPS echo backend with a certificate from `ca` for `names`."""

    def __init__(self, ca: TestCA, tmp: Path, *names: str, name: str = "tls",
                 max_version: ssl.TLSVersion | None = None) -> None:
        self.sni: list[str | None] = []
        self.accepted = 0
        self.failed_handshakes = 0
        self.strays = 0  # stray 408s sent on idle connections (`act_stray`)
        self.resumed: list[bool] = []  # per handshake: whether it resumed a session
        context = server_context(ca, tmp, *names)
        if max_version is not None:
            context.maximum_version = max_version
        context.sni_callback = self._note_sni
        server = type("Server", (TLSBackendServer,), {"context": context})
        super().__init__(name, TLSEchoHandler, server=server)

    def _note_sni(self, _sslobj: Any, name: str | None, _context: Any) -> None:
        self.sni.append(name)

    @property
    def url(self) -> str:
        return f"https://{self.address}"


class SilentServer:
    """Accepts connections and never says a word (a handshake that never ends)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(conn)

    def stop(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()
