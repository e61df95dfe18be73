"""The threaded baseline: the balancer's own handler under one OS thread per
client connection, on blocking sockets, without monkey-patching.

``python -m loadtest.threaded --listen 127.0.0.1:PORT --store file:routes.json``

Invariants:
* The request path is `balancer.connection.handle_client` with the blocking
  `balancer.netio.IO`, so every wait is bounded by socket timeouts; parsing,
  routing, actions, pools and relay are the balancer's own modules, built by
  `balancer.server.Worker`.
* gevent is imported (the worker module needs it) but never patches anything
  and no hub runs: this process has no event loop.
* The store watcher runs in its own thread; a table swap is one assignment.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
from typing import Any

from balancer.accepting import bind
from balancer.addr import parse_addr
from balancer.connection import Context, handle_client
from balancer.netio import IO
from balancer.server import Worker
from balancer.settings import SettingsError, load_settings
from loadtest import configs
from loadtest.limits import raise_nofile


def threaded_context(worker: Worker) -> Context:
    """The context of the worker's listener (its table, pools, stats and `IO`)."""
    return worker.context(False)


def accept_loop(listener: socket.socket, ctx: Context, stop: threading.Event) -> None:
    """Accept forever; each client gets a new daemon thread running the handler."""
    while not stop.is_set():
        try:
            sock, address = listener.accept()
        except OSError:
            if stop.is_set():
                return
            continue
        sock.setblocking(True)
        thread = threading.Thread(target=handle_client, args=(sock, address, ctx), daemon=True)
        thread.start()


def start_watcher(worker: Worker, stop: threading.Event) -> threading.Thread:
    """Follow the store in a thread (the file store polls with time.sleep)."""
    thread = threading.Thread(target=worker.store.watch, args=(worker.apply, stop.is_set),
                              name="store-watch", daemon=True)
    thread.start()
    return thread


def build_worker(listen: str, store_url: str, config: str | None) -> tuple[Worker, Any]:
    """Settings and a `Worker` (its table loaded) for the baseline; exits on bad input."""
    from balancer.stores import open_store

    try:
        settings = load_settings({"server.listen": [listen], "store.url": store_url},
                                 config_path=config)
        store = open_store(settings.store.url, settings.store.namespace,
                           settings.store.resync_interval)
    except SettingsError as exc:
        sys.exit("loadtest.threaded: " + "; ".join(exc.problems))
    except ValueError as exc:
        sys.exit(f"loadtest.threaded: store.url: {exc}")
    worker = Worker(settings, store, io=IO())
    worker.reload()
    return worker, settings


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m loadtest.threaded --listen ADDR --store URL``."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.threaded",
                                     description="The balancer's handler, one thread "
                                                 "per connection, blocking sockets.")
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    parser.add_argument("--store", default="file:balancer-routes.json", help="store URL")
    parser.add_argument("--config", default=None, help="balancer TOML config file")
    args = parser.parse_args(argv)
    raise_nofile()
    worker, settings = build_worker(args.listen, args.store, args.config)
    listener = bind(parse_addr(args.listen), configs.BACKLOG)
    listener.setblocking(True)
    stop = threading.Event()
    start_watcher(worker, stop)
    print(f"threaded baseline listening on {args.listen}, routing version "
          f"{worker.holder.table.version}", flush=True)
    try:
        accept_loop(listener, threaded_context(worker), stop)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        listener.close()


if __name__ == "__main__":
    main()
