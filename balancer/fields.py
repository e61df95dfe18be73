"""Working on a raw header block that llhttp has already validated.

A *field block* is the bytes of a message head between the end of the start
line and the blank line, each field preceded by CRLF:
``b"\\r\\nHost: a\\r\\nX-A: 1"``. Because llhttp rejected bare CR/LF, obs-fold
and whitespace before colons, ``b"\\r\\n" + name + b":"`` in the lower-cased
block finds exactly the fields of that name. Searching a few names in one
block is cheaper than a Python call per field. Both sides keep such blocks:
`balancer.response_parser.ResponseHead.block`, `balancer.http11.RequestHead.block`.
"""

from __future__ import annotations

from collections.abc import Iterable


def field_keys(names: Iterable[bytes]) -> tuple[bytes, ...]:
    """Search keys for `without_fields`: ``b"\\r\\n" + name + b":"`` per lower-case name."""
    return tuple(b"\r\n" + name + b":" for name in names)


def without_fields(block: bytes, lower: bytes, keys: Iterable[bytes]) -> bytes:
    """`block` with every field whose `field_keys` key is in `keys` removed."""
    cuts = []
    for key in keys:
        start = lower.find(key)
        while start >= 0:
            end = block.find(b"\r\n", start + 2)
            if end < 0:
                end = len(block)
            cuts.append((start, end))
            start = lower.find(key, end)
    if not cuts:
        return block
    cuts.sort()
    pieces, pos = [], 0
    for start, end in cuts:
        pieces.append(block[pos:start])
        pos = end
    pieces.append(block[pos:])
    return b"".join(pieces)


def field_list(block: bytes) -> list[tuple[bytes, bytes]]:
    """(name, value) pairs of a block, for code off the hot path (logs, tests)."""
    pairs = []
    for line in block.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b":")
            pairs.append((name, value.strip(b" \t")))
    return pairs


def spellings(names: Iterable[bytes]) -> frozenset[bytes]:
    """Every lower-case name in `names` with each "-" as "-" or "_": CGI-style
    servers (WSGI, PHP, Rack) read ``X_Forwarded_For`` as ``X-Forwarded-For``."""
    out: set[bytes] = set()
    for name in names:
        variants = [b""]
        for part in name.split(b"-"):
            variants = [v + sep + part for v in variants for sep in ((b"-", b"_") if v else (b"",))]
        out.update(variants)
    return frozenset(out)


# Fields that tell a backend who the client is, or how it reached the front door:
# what frameworks trust (Werkzeug ProxyFix: X-Forwarded-For/-Proto/-Host/-Port/-Prefix;
# Django: X-Forwarded-Host/-Port and a configured proto header; Rack/Rails:
# Client-Ip, X-Forwarded-*, -Scheme, -Ssl, Front-End-Https, Forwarded; Express:
# X-Forwarded-For/-Host/-Proto; Symfony/Laravel: X-Forwarded-Prefix, Forwarded;
# ASP.NET: X-Original-*; Spring/Tomcat: X-Forwarded-By/-Ssl; request-ip, chi, gin:
# X-Real-IP, X-Client-IP, True-Client-IP, CF-Connecting-IP, Fastly-Client-IP,
# X-Cluster-Client-IP, X-Appengine-Remote-Addr...) and the rewritten-URL fields
# some trusted (X-Original-URL, X-Rewrite-URL). On an external listener a client
# could forge any of them, so they are all removed there.
CLIENT_FIELDS = spellings((
    b"forwarded", b"forwarded-for", b"x-forwarded", b"x-forwarded-for",
    b"x-forwarded-proto", b"x-forwarded-protocol", b"x-forwarded-scheme",
    b"x-forwarded-ssl", b"front-end-https", b"x-url-scheme", b"x-forwarded-host",
    b"x-forwarded-port", b"x-forwarded-prefix", b"x-forwarded-server", b"x-forwarded-by",
    b"x-forwarded-uri", b"x-real-ip", b"x-client-ip", b"client-ip", b"true-client-ip",
    b"x-cluster-client-ip", b"x-original-forwarded-for", b"x-original-for",
    b"x-original-proto", b"x-original-host", b"x-original-prefix", b"x-original-url",
    b"x-original-uri", b"x-rewrite-url", b"fastly-client-ip", b"cf-connecting-ip",
    b"cf-connecting-ipv6", b"cf-pseudo-ipv4", b"x-proxyuser-ip", b"x-appengine-remote-addr",
    b"x-appengine-user-ip", b"x-envoy-external-address", b"x-real-client-ip",
))
