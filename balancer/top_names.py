"""The names `GET /api/v1/top` and `balancerctl top` accept: what is counted
(`MEASURES`, and `BY`: those or the requests in flight) and by what
(`GROUPS`). Apart from `balancer.sketch`, which counts them, so that
balancerctl lists them without importing the data plane (0.3 s of CPU per run).
"""

from typing import Final

GROUPS: Final = ("client", "host", "path", "backend")
MEASURES: Final = ("requests", "bytes", "errors", "limited")
BY: Final = (*MEASURES, "in_flight")
