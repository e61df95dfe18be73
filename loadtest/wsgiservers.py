"""The two WSGI servers of the `wsgi` scenario, serving the same page.

``python -m loadtest.wsgiservers --kind gevent --listen HOST:PORT`` runs
gevent's ``pywsgi.WSGIServer`` (after ``monkey.patch_all()``, as a gevent app
would); ``--kind threaded`` runs the standard library's ``wsgiref`` under
``socketserver.ThreadingMixIn``: one OS thread per connection, blocking sockets.
Both keep connections alive (HTTP/1.1), set TCP_NODELAY and use the same
listen backlog, so the
comparison is about the concurrency model and the server code, nothing else.
"""

from __future__ import annotations

import argparse
import socket
import sys

from loadtest.configs import BACKLOG


def app(environ: dict, start_response) -> list[bytes]:
    """The WSGI application: the page, whatever the path."""
    from loadtest.page import PAGE

    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                              ("Content-Length", str(len(PAGE)))])
    return [PAGE]


def serve_gevent(host: str, port: int) -> None:
    """gevent's pywsgi server, one greenlet per connection."""
    from gevent import monkey

    monkey.patch_all()
    from gevent.pywsgi import WSGIServer

    from loadtest.limits import raise_nofile

    class NoDelayWSGIServer(WSGIServer):
        def handle(self, sock, address) -> None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().handle(sock, address)

    raise_nofile()
    server = NoDelayWSGIServer((host, port), app, log=None, error_log=sys.stderr,
                               backlog=BACKLOG)
    server.serve_forever()


def serve_threaded(host: str, port: int) -> None:
    """wsgiref with ThreadingMixIn and HTTP/1.1 keep-alive, one thread per connection."""
    import socketserver
    from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

    from loadtest.limits import raise_nofile

    class KeepAliveHandler(ServerHandler):
        http_version = "1.1"

    class KeepAliveRequestHandler(WSGIRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def handle(self) -> None:  # the base class loops handle_one_request
            self.close_connection = True
            self.handle_one_request()
            while not self.close_connection:
                self.handle_one_request()

        def handle_one_request(self) -> None:
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline or len(self.raw_requestline) > 65536:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            handler = KeepAliveHandler(self.rfile, self.wfile, self.get_stderr(),
                                       self.get_environ(), multithread=True)
            handler.request_handler = self
            handler.run(self.server.get_app())

        def log_message(self, format: str, *args: object) -> None:
            return

    class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
        daemon_threads = True
        request_queue_size = BACKLOG

        def handle_error(self, request: object, client_address: object) -> None:
            if not isinstance(sys.exc_info()[1], OSError):  # a client reset is routine
                super().handle_error(request, client_address)

    raise_nofile()
    server = ThreadingWSGIServer((host, port), KeepAliveRequestHandler)
    server.set_app(app)
    server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m loadtest.wsgiservers --kind gevent|threaded --listen ADDR``."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.wsgiservers")
    parser.add_argument("--kind", choices=("gevent", "threaded"), required=True)
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    serve = serve_gevent if args.kind == "gevent" else serve_threaded
    serve(host or "127.0.0.1", int(port))


if __name__ == "__main__":
    main()
