"""SSRF guard: web-scraped URL lists are untrusted, so by default no request may reach a
private, loopback, link-local or otherwise non-public address.

Two places see an address: IP literals in a URL (checked before the request) and names, which
go through :class:`GuardedResolver` inside the connector. Checking in the resolver, on the
very addresses the socket then connects to, leaves no gap for DNS rebinding between a check and
the connection.

The verdict comes from the tables below (the IANA special-purpose registries), not from
``ipaddress``'s ``is_global`` alone: its answers changed between Python releases, and it knows
nothing of IPv6 addresses that lead to an IPv4 host. Those (IPv4-mapped, SIIT, NAT64, 6to4,
IPv4-compatible) are judged by the IPv4 address they lead to; Teredo and NAT64's local-use
prefix are refused whatever they carry.
"""

from __future__ import annotations

import ipaddress
import re
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _networks(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


# IPv4 blocks where no public web server can be: non-global special-purpose blocks, multicast,
# the reserved 240/4 (with the 255.255.255.255 broadcast).
_REFUSED_IPV4 = _networks(
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # private
    "100.64.0.0/10",  # carrier-grade NAT
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local: cloud metadata services live here
    "172.16.0.0/12",  # private
    "192.0.0.0/24",  # IETF protocol assignments (its two anycast /32s serve no web pages)
    "192.0.2.0/24",  # documentation
    "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
    "192.168.0.0/16",  # private
    "198.18.0.0/15",  # benchmarking
    "198.51.100.0/24",  # documentation
    "203.0.113.0/24",  # documentation
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and the limited broadcast 255.255.255.255
)

# IPv6 blocks refused outright, whatever they might embed.
_REFUSED_IPV6 = _networks(
    "::/128",  # unspecified
    "::1/128",  # loopback
    "64:ff9b:1::/48",  # NAT64 local-use: where the IPv4 address sits is the operator's choice
    "100::/64",  # discard-only
    "2001::/23",  # IETF protocol assignments: Teredo (2001::/32), benchmarking, ORCHID, ...
    "2001:db8::/32",  # documentation
    "3fff::/20",  # documentation
    "5f00::/16",  # SRv6 segment identifiers
    "fc00::/7",  # unique local
    "fe80::/10",  # link-local
    "fec0::/10",  # site-local (deprecated)
    "ff00::/8",  # multicast
)

# IPv6 prefixes whose last 32 bits are an IPv4 address: a connection to such an address ends
# at that IPv4 host (made by the kernel itself, or by a translator on the way), so the IPv4
# address is the one judged. 6to4 (2002::/16) embeds it in bits 16-48 instead.
_IPV4_IN_LAST_32_BITS = _networks(
    "::ffff:0:0/96",  # IPv4-mapped
    "::ffff:0:0:0/96",  # IPv4-translated (SIIT)
    "64:ff9b::/96",  # NAT64 well-known prefix
    "::/96",  # IPv4-compatible (deprecated)
)

# What inet_aton (and so getaddrinfo, behind any resolver) reads as an IPv4 address: one to
# four dot-separated numbers, each decimal, octal (leading 0) or hex (0x). 2130706433,
# 0177.0.0.1, 0x7f.1 and 127.1 are all 127.0.0.1.
_INET_ATON_FORM = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}", re.IGNORECASE)


class PrivateAddressError(OSError):
    """A destination resolved to an address the guard refuses."""


def is_public_address(address: str) -> bool:
    """True when ``address`` is a globally routable unicast IP address.

    An IPv6 address that leads to an IPv4 host is judged by that IPv4 address. Anything that
    is not an address in canonical form is refused.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return False
    return _is_public(ip)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address that ``ip`` leads to, for the prefixes that embed one, else None."""
    if ip.sixtofour is not None:
        return ip.sixtofour
    if _within(ip, _IPV4_IN_LAST_32_BITS):
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return None


def ip_literal(host: str) -> str | None:
    """The address if ``host`` is an IP literal, else None.

    Reads every host that the system resolver would read as an address without asking DNS,
    not only the canonical forms: ``[::1]``, and each IPv4 form inet_aton accepts
    (``2130706433``, ``0177.0.0.1``, ``0x7f.1``, ``127.1``). With a trailing dot too, as
    browsers read it: such a host is an address, never a name worth a DNS query.
    """
    host = host.strip("[]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    dotted = host.removesuffix(".")
    if not _INET_ATON_FORM.fullmatch(dotted):
        return None  # a name (inet_aton would also take "127.0.0.1 junk": not a URL host)
    try:
        return socket.inet_ntoa(socket.inet_aton(dotted))
    except OSError:  # numbers out of range, e.g. 256.1.1.1: a name, which DNS will not know
        return None


class GuardedResolver(AbstractResolver):
    """Resolves names with ``base`` and refuses any answer that is not a public address."""

    def __init__(self, base: AbstractResolver | None = None) -> None:
        self._base = base or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._base.resolve(host, port, family)
        # One bad answer refuses the name: the connector would try each answer in turn.
        refused = [r["host"] for r in results if not is_public_address(r["host"])]
        if refused:
            raise PrivateAddressError(f"{host} resolves to non-public address {refused[0]}")
        return results

    async def close(self) -> None:
        await self._base.close()


def _is_public(ip: IPAddress) -> bool:
    # is_global as well as the tables: a block this Python knows to be special-purpose is
    # refused too.
    if isinstance(ip, ipaddress.IPv4Address):
        return ip.is_global and not _within(ip, _REFUSED_IPV4)
    if _within(ip, _REFUSED_IPV6):
        return False
    embedded = embedded_ipv4(ip)
    return _is_public(embedded) if embedded is not None else ip.is_global


def _within(ip: IPAddress, networks: tuple) -> bool:
    return any(ip in network for network in networks)
