"""Kinds of setting values: how a raw value becomes a typed, validated one.

A kind parses either a typed value (config file, typed flag) or text (an
environment variable, a string flag). A typed value of the wrong type is
rejected, never coerced: ``backend_read = "5"`` in TOML is an error. Every
rejection is a ``Rejected`` whose message says what the value must be and
what it was, ready to be prefixed with the setting name and source.
"""

from __future__ import annotations

import grp
import ipaddress
import json
import math
import os
import pwd

from balancer.addr import HOSTNAME, AddrError, Address, parse_addr
from balancer.stores.urls import (
    URL_FORMS,
    StoreUrlError,
    redact_url,
    redis_url_problem,
    store_kind,
)


class Rejected(ValueError):
    """A raw value refused by its kind; the message is complete and shows the value."""


def reject(expected: str, raw: object) -> Rejected:
    return Rejected(f"must be {expected}, got {raw!r}")


class Kind:
    """Base kind: a string, taken as is."""

    expected = "a string"
    metavar = "TEXT"
    types: tuple[type, ...] = (str,)

    def parse(self, raw: object, is_text: bool) -> object:
        """Return the typed value for ``raw`` or raise ``Rejected``."""
        if is_text:
            return self.check(self.convert(raw), raw)
        if isinstance(raw, str) and list in self.types:  # `listen = "a:1"` in TOML
            raise Rejected(f"must be {self.expected}, got {raw!r}: a TOML array, "
                           f"[{json.dumps(raw)}]")
        if isinstance(raw, bool) or not isinstance(raw, self.types):
            raise reject(self.expected, raw)
        return self.check(raw, raw)

    def convert(self, text: str) -> object:
        """Turn environment/flag text into the typed value (before ``check``)."""
        return text

    def check(self, value: object, raw: object) -> object:
        """Validate a typed value; ``raw`` is what the user wrote, for the message."""
        return value


class Number(Kind):
    """A finite float greater than zero (seconds), or with `zero` at or above it;
    at most `maximum` when one is given."""

    metavar = "SECONDS"
    types = (int, float)

    def __init__(self, zero: bool = False, maximum: float | None = None) -> None:
        self.zero = zero
        self.maximum = math.inf if maximum is None else maximum
        self.expected = "a number >= 0" if zero else "a number > 0"
        if maximum is not None:
            self.expected = f"a number from {0 if zero else 'above 0'} to {maximum:g}"

    def convert(self, text: str) -> object:
        try:
            return float(text)
        except ValueError:
            raise reject(self.expected, text) from None

    def check(self, value: object, raw: object) -> float:
        if not (math.isfinite(value) and (value > 0 or (self.zero and value == 0))
                and value <= self.maximum):
            raise reject(self.expected, raw)
        return float(value)


# The most any integer setting takes. Bug: limits.max_headers = 10**20 was taken, and
# every request was then answered 400 (a field count past what a C size holds).
INT_MAX = 2**31 - 1


class Integer(Kind):
    """An integer from ``minimum`` to ``maximum`` (`INT_MAX` unless given)."""

    metavar = "N"
    types = (int,)

    def __init__(self, minimum: int, maximum: int = INT_MAX) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.expected = f"an integer from {minimum} to {maximum}"

    def convert(self, text: str) -> object:
        try:
            return int(text)
        except ValueError:
            raise reject(self.expected, text) from None

    def check(self, value: object, raw: object) -> int:
        if not self.minimum <= value <= self.maximum:
            raise reject(self.expected, raw)
        return value


class Boolean(Kind):
    """true or false; in the environment also 1/0, yes/no, on/off."""

    expected = "true or false"
    metavar = "BOOL"
    types = (bool,)
    WORDS = {"true": True, "1": True, "yes": True, "on": True,
             "false": False, "0": False, "no": False, "off": False}

    def parse(self, raw: object, is_text: bool) -> object:
        if is_text:
            value = self.WORDS.get(str(raw).strip().lower())
            if value is None:
                raise reject(self.expected, raw)
            return value
        if not isinstance(raw, bool):
            raise reject(self.expected, raw)
        return raw


class Choice(Kind):
    """One string out of a fixed set."""

    def __init__(self, *options: str) -> None:
        self.options = options
        self.expected = "one of " + ", ".join(options)
        self.metavar = "{" + ",".join(options) + "}"

    def check(self, value: object, raw: object) -> str:
        if value not in self.options:
            raise reject(self.expected, raw)
        return value


class Name(Kind):
    """A non-empty string without whitespace (a key prefix)."""

    expected = "a non-empty name without spaces"
    metavar = "NAME"

    def check(self, value: object, raw: object) -> str:
        if not value or any(ch.isspace() for ch in value):
            raise reject(self.expected, raw)
        return value


class AddressKind(Kind):
    """One listen address, ``host:port``, ``[v6]:port`` or ``:port``."""

    expected = "an address: host:port, [v6]:port or :port"
    metavar = "ADDR"
    types = (str, Address)

    def check(self, value: object, raw: object) -> Address:
        if isinstance(value, Address):
            return value
        if len(value.split()) > 1:  # issue 17: "IPv6 host must be in brackets" misled
            raise Rejected(f"must be one address, got {value!r} (several, separated by spaces)")
        try:
            return parse_addr(value)
        except AddrError as exc:
            raise Rejected(str(exc)) from None


class AddressList(Kind):
    """Listen addresses: a list in TOML and flags, comma-separated in env."""

    expected = "a list of addresses"
    metavar = "ADDR"
    types = (list, tuple)

    def convert(self, text: str) -> object:
        return [item.strip() for item in text.split(",")] if text.strip() else []

    def check(self, value: object, raw: object) -> tuple[Address, ...]:
        items = _each_string(value, raw)
        for item in items:
            if isinstance(item, str) and len(item.split()) > 1:
                raise Rejected(f"{item!r} holds several addresses separated by spaces; give "
                               f"one per list item (TOML) or per flag, or separate them with "
                               f"commas in the environment: {','.join(item.split())}")
        return tuple(ADDRESS.check(item, raw) for item in items)


def _each_string(items: list | tuple, raw: object) -> list[str | Address]:
    for item in items:
        if not isinstance(item, str | Address):
            raise Rejected(f"must be a list of address strings, got {raw!r}")
    return list(items)


class HostNames(Kind):
    """Host names a ``Host`` header may carry: a list in TOML, comma-separated in
    env. Each is a DNS name or IP literal (no port), ``.example.com`` for the
    name and every subdomain, or ``*`` for any; kept lower-case, IPv6 bare."""

    expected = "a list of host names (name, IP, .domain or *)"
    metavar = "HOST"
    types = (list, tuple)

    def convert(self, text: str) -> object:
        return [item.strip() for item in text.split(",")] if text.strip() else []

    def check(self, value: object, raw: object) -> tuple[str, ...]:
        names = []
        for item in value:
            if not isinstance(item, str):
                raise Rejected(f"must be a list of host name strings, got {raw!r}")
            name = _host_name(item)
            if name is None:
                raise Rejected(f"{item!r} is not a host name, IP address, .domain or *")
            names.append(name)
        return tuple(names)


def _host_name(item: str) -> str | None:
    """`item` normalised (lower case, IPv6 without brackets), or None if invalid."""
    text = item.strip().lower()
    if text == "*":
        return text
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    name = text[1:] if text.startswith(".") else text
    return text if name and HOSTNAME.fullmatch(name) else None


class StoreUrl(Kind):
    """A store URL; the scheme and a Redis URL's database and replication options
    are checked here (`balancer.stores.urls`), the stores parse the rest. A
    password never appears in a message."""

    expected = f"a store URL: {URL_FORMS}"
    metavar = "URL"

    def check(self, value: object, raw: object) -> str:
        shown = redact_url(raw) if isinstance(raw, str) else raw
        try:
            store_kind(value)
        except StoreUrlError:
            raise reject(self.expected, shown) from None
        problem = redis_url_problem(str(value))
        if problem:
            raise Rejected(f"{problem}, in {shown!r}")
        return str(value)


class SnapshotPath(Kind):
    """"" (the default place), "off", or a file path in an existing directory."""

    expected = '"", "off", or a file path in an existing directory'
    metavar = "PATH"

    def check(self, value: object, raw: object) -> str:
        if value in ("", "off"):
            return value
        directory = os.path.dirname(os.path.abspath(value))
        if value.endswith("/") or not os.path.isdir(directory) or os.path.isdir(value):
            raise reject(self.expected, raw)
        return value


class Directory(Kind):
    """"" (unset) or an existing directory."""

    expected = "an existing directory"
    metavar = "DIR"

    def check(self, value: object, raw: object) -> str:
        if value and not os.path.isdir(value):
            raise reject(self.expected, raw)
        return value


class CipherList(Kind):
    """An OpenSSL cipher list that selects at least one cipher."""

    expected = "an OpenSSL cipher list selecting at least one cipher"
    metavar = "CIPHERS"

    def check(self, value: object, raw: object) -> str:
        import ssl

        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(value)
        except ssl.SSLError:
            raise reject(self.expected, raw) from None
        return value


# Mozilla's "intermediate" TLS 1.2 ciphers (ssl-config.mozilla.org, guidelines 5.7)
MOZILLA_INTERMEDIATE = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305"))


class AcmeUrl(Kind):
    """An ACME directory URL: ``https://HOST[:PORT]/PATH`` (``http://`` only for a CA
    on loopback, as a test CA may be)."""

    expected = "an https:// URL of an ACME directory (http:// only on loopback)"
    metavar = "URL"

    def check(self, value: object, raw: object) -> str:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value)
            host = parts.hostname or ""
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise reject(self.expected, raw) from None
        loopback = host in ("localhost", "127.0.0.1", "::1")
        if not host or any(c.isspace() for c in value) or not (
                parts.scheme == "https" or (parts.scheme == "http" and loopback)):
            raise reject(self.expected, raw)
        return value


class Email(Kind):
    """"" (none) or one e-mail address ``NAME@DOMAIN``."""

    expected = 'an e-mail address (name@example.com) or ""'
    metavar = "ADDRESS"

    def check(self, value: object, raw: object) -> str:
        if not value:
            return value
        name, at, domain = value.rpartition("@")
        if not (at and name and "." in domain.strip(".") and value.isascii()
                and value.isprintable() and not any(c.isspace() or c in "<>,;:" for c in value)):
            raise reject(self.expected, raw)
        return value


class PemFile(Kind):
    """"" (unset) or a readable file holding at least one PEM certificate."""

    expected = '"" or a readable PEM file of CA certificates'
    metavar = "FILE"

    def check(self, value: object, raw: object) -> str:
        if not value:
            return value
        try:
            with open(value, "rb") as f:
                text = f.read(1 << 20)
        except OSError as exc:
            raise Rejected(f"{value!r}: cannot read: {exc.strerror or exc}") from None
        if b"-----BEGIN CERTIFICATE-----" not in text:
            raise Rejected(f"{value!r}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
        return value


LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"


class Account(Kind):
    """"" (unset), an existing user/group name, or a numeric id."""

    metavar = "NAME"

    def __init__(self, what: str) -> None:
        self.what = what
        self.expected = f"an existing {what} name or a numeric id"

    def check(self, value: object, raw: object) -> str:
        if not value or (value.isascii() and value.isdecimal()):
            return value
        lookup = pwd.getpwnam if self.what == "user" else grp.getgrnam
        try:
            lookup(value)
        except KeyError:
            raise reject(self.expected, raw) from None
        return value


def token_problem(token: str) -> str | None:
    """What makes `token` one no client can send in ``Authorization: Bearer TOKEN``
    (None when it is visible ASCII without spaces at its ends); never the token."""
    if not token.isascii():
        return "a character that is not ASCII"
    if not token.isprintable():
        return "a control character"
    if token != token.strip():
        return "spaces at an end"
    return None


class Token(Kind):
    """A bearer token: "" (none), or one a client can send (`token_problem`). Bug: a
    token with a control character, a space at an end or a non-ASCII letter was
    taken, and no request could match it. The message never shows the token."""

    def check(self, value: object, raw: object) -> object:
        found = token_problem(value) if isinstance(value, str) and value else None
        if found is None:
            return value
        raise Rejected("must be visible ASCII (spaces only inside), as a bearer token is "
                       f"sent; the token given has {found}")


TEXT = Kind()
TOKEN = Token()
BOOLEAN = Boolean()
NAME = Name()
POSITIVE = Number()
NON_NEGATIVE = Number(zero=True)
ADDRESS = AddressKind()
ADDRESS_LIST = AddressList()
HOST_NAMES = HostNames()
CIPHER_LIST = CipherList()
ACME_URL = AcmeUrl()
EMAIL = Email()
PEM_FILE = PemFile()
