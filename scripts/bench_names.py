"""The CPU cost of a new connection to a backend named by a host name
(`localhost`, from /etc/hosts: no DNS server involved), under gevent as in a
worker: `Backend.connect` in turn, then in rounds of 50 at once (which share
one lookup per round since `balancer.resolve`). Prints microseconds of CPU
(this process's, the resolver threads' included) per connect.

    PYTHONPATH=/tmp/build python3 scripts/bench_names.py --connects 3000
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402 - after patching, as a worker imports
import time  # noqa: E402

import gevent  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

from balancer.addr import parse_backend_addr  # noqa: E402
from balancer.netio import GeventIO  # noqa: E402
from balancer.pool import Backend  # noqa: E402

AT_ONCE = 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connects", type=int, default=3000, help="connects per measure")
    args = parser.parse_args()
    server = StreamServer(("127.0.0.1", 0), lambda sock, _: sock.close(), backlog=1024)
    server.start()
    backend = Backend(parse_backend_addr(f"localhost:{server.server_port}"),
                      connect_timeout=5.0, fail_timeout=10.0, io=GeventIO())

    def one() -> None:
        backend.connect().close()

    for _ in range(200):  # warm up
        one()
    began = time.process_time()
    for _ in range(args.connects):
        one()
    in_turn = (time.process_time() - began) / args.connects * 1e6
    rounds = max(1, args.connects // AT_ONCE)
    began = time.process_time()
    for _ in range(rounds):
        gevent.joinall([gevent.spawn(one) for _ in range(AT_ONCE)], raise_error=True)
    at_once = (time.process_time() - began) / (rounds * AT_ONCE) * 1e6
    print(f"{in_turn:.1f} µs CPU per connect in turn, {at_once:.1f} µs {AT_ONCE} at once")
    server.stop()


if __name__ == "__main__":
    main()
