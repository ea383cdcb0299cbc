"""Configuration: TOML in, typed Structs out; every mistake named by file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastmta.delivery.config import (
    Config,
    DnsConfig,
    HostPort,
    RoutingConfig,
    config_from_dict,
    load_config,
    parse_hostport,
)
from fastmta.errors import ConfigError

FULL = """
[dns]
nameservers = ["127.0.0.1:5353", "::1", "[::1]:5354"]
timeout = 2.5
min_ttl = 5
max_ttl = 600
negative_min_ttl = 1
negative_max_ttl = 60
cache_size = 100
max_concurrent = 8
prefer_ipv6 = true

[routing]
smtp_port = 2525

[routing.static]
"Example.COM" = ["127.0.0.1:2526", "relay.example.net"]
"*.corp.example" = ["[::1]:25"]
"*" = ["smarthost.example:587"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fastmta.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_full_file_loads_into_typed_structs(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL))
    assert cfg.dns.timeout == 2.5
    assert (cfg.dns.min_ttl, cfg.dns.max_ttl, cfg.dns.negative_min_ttl, cfg.dns.negative_max_ttl) == (5, 600, 1, 60)
    assert (cfg.dns.cache_size, cfg.dns.max_concurrent, cfg.dns.prefer_ipv6) == (100, 8, True)
    assert cfg.dns.nameserver_addresses() == [
        HostPort("127.0.0.1", 5353),
        HostPort("::1", 53),
        HostPort("::1", 5354),
    ]
    assert cfg.routing.smtp_port == 2525
    assert cfg.routing.static_routes() == {
        "example.com": [HostPort("127.0.0.1", 2526), HostPort("relay.example.net", 2525)],
        ".corp.example": [HostPort("::1", 25)],
        "*": [HostPort("smarthost.example", 587)],
    }


def test_empty_file_gives_working_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert cfg == Config()
    assert cfg.dns.nameservers == []
    assert cfg.routing.smtp_port == 25
    assert cfg.dns.min_ttl <= cfg.dns.max_ttl
    assert cfg.routing.static_routes() == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[dns]\nmin_tll = 3\n", "dns.min_tll: unknown key"),
        ("[dnss]\n", "dnss: unknown key"),
        ("[routing]\nsmtp_port = 0\n", "routing.smtp_port: Expected `int` >= 1"),
        ("[routing]\nsmtp_port = 70000\n", "routing.smtp_port: Expected `int` <= 65535"),
        ('[dns]\ntimeout = "fast"\n', "dns.timeout: Expected `float`, got `str`"),
        ("[dns]\ntimeout = 0\n", "dns.timeout: Expected `float` > 0"),
        ("[dns]\ncache_size = 0\n", "dns.cache_size: Expected `int` >= 1"),
        ("[dns]\nmin_ttl = 100\nmax_ttl = 10\n", "dns: min_ttl (100) is greater than max_ttl (10)"),
        ("[dns]\nnegative_min_ttl = 100\nnegative_max_ttl = 10\n", "dns: negative_min_ttl (100)"),
        ('[dns]\nnameservers = ["ns1.example"]\n', "dns: nameserver 'ns1.example' must be an IP address"),
        ('[dns]\nnameservers = ["127.0.0.1:99999"]\n', "bad port"),
        ('[routing.static]\n"a*.example" = ["h"]\n', "bad route pattern 'a*.example'"),
        ('[routing.static]\n"example.com" = []\n', "static route 'example.com' has no hosts"),
        ('[routing.static]\n".x.test" = ["h"]\n"*.x.test" = ["h"]\n', "are the same pattern"),
        ('[routing.static]\n"x.test" = ["h:port"]\n', "bad port in 'h:port'"),
        ('[routing.static]\n"x.test" = [25]\n', 'routing.static."x.test"[0]: Expected `str`, got `int`'),
        # A table's key by name, not msgspec's [...] (found by an attack on intake).
        ('[sites."a.test"]\nmax_connections = 2\n[sites."*"]\nmax_connections = 0\n',
         'sites."*".max_connections: Expected `int` >= 1'),
        ('[sites."*"]\nrate = ["20/fortnight"]\n', "sites.\"*\": bad rate spec '20/fortnight'"),
        ("[dns\n", "invalid TOML"),
    ],
)
def test_mistakes_name_the_file_and_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.toml: cannot read"):
        load_config(tmp_path / "nope.toml")


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_config_from_dict_and_structs_agree() -> None:
    built = Config(dns=DnsConfig(nameservers=["127.0.0.1:53"]), routing=RoutingConfig(smtp_port=26))
    assert config_from_dict({"dns": {"nameservers": ["127.0.0.1:53"]}, "routing": {"smtp_port": 26}}) == built
    with pytest.raises(ConfigError, match=r"^test: dns.bogus: unknown key$"):
        config_from_dict({"dns": {"bogus": 1}}, "test")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mx.example.com", HostPort("mx.example.com", 25)),
        ("MX.Example.COM.:2525", HostPort("mx.example.com", 2525)),
        ("127.0.0.1", HostPort("127.0.0.1", 25)),
        ("127.0.0.1:26", HostPort("127.0.0.1", 26)),
        ("::1", HostPort("::1", 25)),
        ("[::1]", HostPort("::1", 25)),
        ("[0:0::1]:27", HostPort("::1", 27)),
        ("bücher.example:25", HostPort("xn--bcher-kva.example", 25)),
        # Postfix's [name]:port spelling (no MX lookup: static hosts never get one)
        ("[relay.example]:26", HostPort("relay.example", 26)),
    ],
)
def test_parse_hostport(text: str, expected: HostPort) -> None:
    assert parse_hostport(text, 25) == expected


@pytest.mark.parametrize("bad", ["", "host:", "host:0", "[::1]:x", "1:2:3:zz", "a..b", "[a..b]:25"])
def test_parse_hostport_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(bad, 25)


def test_hostport_text_brackets_ipv6() -> None:
    assert str(HostPort("::1", 25)) == "[::1]:25"
    assert str(HostPort("mx.example", 25)) == "mx.example:25"
    assert HostPort("::1", 25).is_ip and not HostPort("mx.example", 25).is_ip
