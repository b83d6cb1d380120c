"""The SSRF guard: private, loopback and link-local destinations are refused by default."""

from __future__ import annotations

import asyncio
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from conftest import make_image
from vlmdata.pipeline.address_guard import (
    GuardedResolver,
    PrivateAddressError,
    ip_literal,
    is_public_address,
)
from vlmdata.pipeline.download import DownloadConfig, run_download
from vlmdata.pipeline.fetch import FetchPolicy


class StaticResolver(AbstractResolver):
    """Resolves a fixed table of names; any other name fails like an NXDOMAIN answer."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in self.table:
            raise OSError(socket.EAI_NONAME, f"Name or service not known: {host}")
        return [{"hostname": host, "host": self.table[host], "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST}]  # fmt: skip

    async def close(self) -> None:
        pass


# Addresses that reach the public internet.
PUBLIC = [
    "8.8.8.8", "1.1.1.1", "2606:4700::1111", "2a00:1450:4001:82a::200e",
    "64:ff9b::808:808",  # NAT64 well-known prefix in front of 8.8.8.8
    "2002:808:808::1",  # 6to4 in front of 8.8.8.8
    "::808:808",  # IPv4-compatible (deprecated) 8.8.8.8
    "::ffff:8.8.8.8",  # IPv4-mapped
    "::ffff:0:808:808",  # IPv4-translated (SIIT)
]  # fmt: skip

# Addresses that reach this machine, a private network or nothing: each must be refused.
NOT_PUBLIC = [
    # IPv4 special-purpose ranges
    "127.0.0.1", "127.255.255.254", "10.1.2.3", "172.16.0.1", "172.31.255.255",
    "192.168.1.1", "169.254.169.254", "100.64.0.1", "100.127.255.254", "0.0.0.0", "0.1.2.3",
    "192.0.0.1", "192.0.0.9", "192.0.2.1", "198.51.100.7", "203.0.113.9", "198.18.0.1",
    "198.19.255.255", "192.88.99.1", "224.0.0.1", "239.255.255.250", "240.0.0.1",
    "255.255.255.255",
    # IPv6 special-purpose ranges
    "::1", "::", "fe80::1", "fe80::1%eth0", "fc00::1", "fd12:3456::1", "fec0::1", "ff02::1",
    "ff0e::1", "2001:db8::1", "3fff::1", "100::1", "2001:2::1", "2001:10::1", "5f00::1",
    # IPv4 embedded in IPv6: judged by the IPv4 address, which is private here
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
    "::ffff:0:7f00:1", "::ffff:0:a00:1",  # SIIT
    "::7f00:1", "::a00:1", "::a9fe:a9fe",  # IPv4-compatible
    "64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::6440:1",  # NAT64
    "2002:7f00:1::1", "2002:a00:1::", "2002:a9fe:a9fe:1::1",  # 6to4
    # Refused whatever they embed
    "64:ff9b:1::808:808", "64:ff9b:1::a00:1",  # NAT64 local-use prefix
    "2001:0:4136:e378:8000:63bf:3fff:fdd2", "2001::1",  # Teredo
    # Not an address at all
    "", "not-an-address", "127.1",
]  # fmt: skip


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address):
    assert is_public_address(address) is True


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_non_public_addresses_are_refused(address):
    assert is_public_address(address) is False


# Hosts that inet_aton (and so getaddrinfo, behind aiohttp's resolver) reads as IPv4 addresses.
ODD_IPV4_LITERALS = {
    "2130706433": "127.0.0.1",  # one 32-bit decimal number
    "0x7f000001": "127.0.0.1",  # one hex number
    "017700000001": "127.0.0.1",  # one octal number
    "0177.0.0.1": "127.0.0.1",  # octal part
    "0x7f.1": "127.0.0.1",  # hex part, short form
    "0x7F.0x0.0x0.0x1": "127.0.0.1",
    "127.1": "127.0.0.1",  # short form: the last part fills the rest
    "127.0.1": "127.0.0.1",
    "127.000.000.001": "127.0.0.1",  # leading zeros: octal, still 127.0.0.1
    "127.0.0.1.": "127.0.0.1",  # a fully qualified "name"
    "10.1": "10.0.0.1",
    "3232235777": "192.168.1.1",
    "0": "0.0.0.0",
    "134744072": "8.8.8.8",
}


@pytest.mark.parametrize(("host", "address"), ODD_IPV4_LITERALS.items())
def test_ip_literal_reads_every_ipv4_form(host, address):
    assert ip_literal(host) == address


@pytest.mark.parametrize(
    ("host", "address"),
    [("127.0.0.1", "127.0.0.1"), ("[::1]", "::1"), ("::1", "::1"),
     ("[64:ff9b::127.0.0.1]", "64:ff9b::7f00:1"), ("fe80::1%eth0", "fe80::1%eth0")],
)  # fmt: skip
def test_ip_literal_reads_canonical_literals(host, address):
    assert ip_literal(host) == address


@pytest.mark.parametrize(
    "host",
    ["example.com", "images.test", "deadbeef", "1.2.3.4.5", "127.0.0.1.1", "123.example",
     "0x7f.example", "256.256.256.256", "1.2.3.4 x", "127.0.0.1..", "", "localhost"],
)  # fmt: skip
def test_ip_literal_leaves_names_alone(host):
    assert ip_literal(host) is None


class OneAnswerResolver(AbstractResolver):
    """Answers every name with one fixed address, and records the names asked."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        kind = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        return [{"hostname": host, "host": self.address, "port": port, "family": kind,
                 "proto": 0, "flags": socket.AI_NUMERICHOST}]  # fmt: skip

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("address", [a for a in NOT_PUBLIC if a])
def test_guarded_resolver_refuses_names_that_resolve_to_non_public_addresses(address):
    resolver = GuardedResolver(OneAnswerResolver(address))
    with pytest.raises(PrivateAddressError):
        asyncio.run(resolver.resolve("innocent.test", 80))


@pytest.mark.parametrize("address", PUBLIC)
def test_guarded_resolver_passes_public_answers_through(address):
    stub = OneAnswerResolver(address)
    results = asyncio.run(GuardedResolver(stub).resolve("public.test", 443))
    assert [r["host"] for r in results] == [address] and stub.asked == ["public.test"]


def run(server, tmp_path, urls, allow: bool) -> dict[str, dict]:
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"image_url": urls, "capsfusion": ["c"] * len(urls)}), path)
    out = tmp_path / ("allowed" if allow else "guarded")
    resolver = StaticResolver({"images.test": "127.0.0.1", "localhost": "127.0.0.1"})
    config = DownloadConfig(
        input=str(path), output_dir=str(out), processes=1, quiet=True,
        fetch=FetchPolicy(allow_private_network=allow, retries=0, timeout=5),
    )  # fmt: skip
    run_download(config, resolver=resolver)
    return {
        r["url"]: r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()
    }


def test_private_destinations_refused_without_the_flag(server, tmp_path):
    server.add_file("a.jpg", make_image(32, 32))
    port = server.port
    urls = [
        f"http://127.0.0.1:{port}/img/a.jpg",
        f"http://localhost:{port}/img/a.jpg",
        f"http://images.test:{port}/img/a.jpg",  # a name that resolves to loopback
        f"http://[::1]:{port}/img/a.jpg",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata: never even connected to
        f"http://nowhere.test:{port}/img/a.jpg",
    ]
    rows = run(server, tmp_path, urls, allow=False)
    for url in urls[:5]:
        assert (rows[url]["status"], rows[url]["error_kind"]) == (
            "failed_to_download",
            "private_address",
        )
    assert rows[urls[5]]["error_kind"] == "dns"
    assert server.total_hits() == 0


def test_allow_private_network_lets_them_through(server, tmp_path):
    server.add_file("a.jpg", make_image(32, 32))
    urls = [
        f"http://images.test:{server.port}/img/a.jpg",
        f"http://127.0.0.1:{server.port}/img/a.jpg",
    ]
    rows = run(server, tmp_path, urls, allow=True)
    assert all(r["status"] == "success" for r in rows.values())
