import socket

import pytest

from balancer.addr import AddrError, Address, parse_addr, parse_backend_addr


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("localhost:80", "localhost", 80),
        ("app-1.example.com:443", "app-1.example.com", 443),
        ("[::1]:8080", "::1", 8080),
        ("[2001:db8::5]:1", "2001:db8::5", 1),
        (":9000", "0.0.0.0", 9000),
        ("127.0.0.1:0", "127.0.0.1", 0),
        ("127.0.0.1:65535", "127.0.0.1", 65535),
    ],
)
def test_parse_addr_accepts_the_three_forms(text, host, port):
    assert parse_addr(text) == Address(host, port)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("127.0.0.1", "missing ':port'"),
        ("", "missing ':port'"),
        ("127.0.0.1:", "port '' is not a number"),
        ("127.0.0.1:http", "port 'http' is not a number"),
        ("127.0.0.1:-1", "port '-1' is not a number"),
        ("127.0.0.1:65536", "port must be 0..65535, got 65536"),
        ("127.0.0.1:٨٠", "is not a number"),
        ("::1:8080", "IPv6 host must be in brackets"),
        ("[::1]8080", "expected [v6]:port"),
        ("[::1:8080", "expected [v6]:port"),
        ("[example.com]:80", "is not an IPv6 address"),
        ("bad host:80", "is not a valid host name or IP"),
        ("http://x:80", "no scheme or path allowed"),
        ("999.1.1.1:80", "is not a valid host name or IP"),
        ("-leading.example:80", "is not a valid host name or IP"),
        ("127.1:80", "'127.1' is another spelling of the IPv4 address 127.0.0.1"),
        ("0x7f.1:80", "'0x7f.1' is another spelling of the IPv4 address 127.0.0.1"),
        ("0x10:80", "is another spelling of the IPv4 address 0.0.0.16"),
        ("2130706433:80", "; write 127.0.0.1"),
    ],
)
def test_parse_addr_rejects_with_a_clear_message(text, problem):
    with pytest.raises(AddrError) as info:
        parse_addr(text)
    assert problem in str(info.value)
    assert repr(text) in str(info.value)


def test_parse_addr_rejects_non_strings():
    with pytest.raises(AddrError, match="expected a string"):
        parse_addr(8080)  # type: ignore[arg-type]


def test_addr_error_is_a_value_error():
    assert issubclass(AddrError, ValueError)


def test_parse_backend_addr():
    assert parse_backend_addr("10.0.0.1:9001") == Address("10.0.0.1", 9001)
    assert parse_backend_addr("[::1]:9002") == Address("::1", 9002)
    with pytest.raises(AddrError, match="a host is required"):
        parse_backend_addr(":9001")
    with pytest.raises(AddrError, match="port must be 1..65535, got 0"):
        parse_backend_addr("10.0.0.1:0")
    with pytest.raises(AddrError, match="missing ':port'"):
        parse_backend_addr("10.0.0.1")


def test_str_round_trips():
    for text in ["127.0.0.1:8080", "[::1]:8080", "[fe80::1%eth0]:80", "example.com:1"]:
        assert str(parse_addr(text)) == text
    assert str(parse_addr(":80")) == "0.0.0.0:80"


def test_family():
    assert parse_addr("127.0.0.1:1").family == socket.AF_INET
    assert parse_addr("example.com:1").family == socket.AF_INET
    assert parse_addr("[::]:1").family == socket.AF_INET6


def test_is_loopback():
    assert parse_addr("127.0.0.1:1").is_loopback
    assert parse_addr("127.1.2.3:1").is_loopback
    assert parse_addr("[::1]:1").is_loopback
    assert parse_addr("LocalHost:1").is_loopback
    assert not parse_addr(":1").is_loopback
    assert not parse_addr("[::]:1").is_loopback
    assert not parse_addr("10.0.0.1:1").is_loopback
    assert not parse_addr("example.com:1").is_loopback


def test_address_is_frozen_and_hashable():
    addr = parse_addr("127.0.0.1:1")
    with pytest.raises(AttributeError):
        addr.port = 2  # type: ignore[misc]
    assert {addr, parse_addr("127.0.0.1:1")} == {addr}


def test_parsed_address_binds():
    addr = parse_addr("127.0.0.1:0")
    with socket.socket(addr.family, socket.SOCK_STREAM) as sock:
        sock.bind((addr.host, addr.port))
        assert sock.getsockname()[0] == "127.0.0.1"
