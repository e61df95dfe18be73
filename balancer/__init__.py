"""balancer: a gevent reverse proxy and HTTP load balancer (README.md)."""

__version__ = "0.1.0"  # the package's version (pyproject.toml reads it from here)
