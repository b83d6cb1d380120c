"""SSRF guard: web-scraped URL lists are untrusted, so by default no request may reach a
private, loopback, link-local or otherwise non-public address.

Two places see an address: IP literals in a URL (checked before the request) and names, which
go through :class:`GuardedResolver` inside the connector. Checking in the resolver, on the
very addresses the socket then connects to, leaves no gap for DNS rebinding between a check and
the connection.
"""

from __future__ import annotations

import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver


class PrivateAddressError(OSError):
    """A destination resolved to an address the guard refuses."""


def is_public_address(address: str) -> bool:
    """True when ``address`` is a globally routable unicast IP address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def ip_literal(host: str) -> str | None:
    """The address if ``host`` is an IP literal (``[::1]`` included), else None."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


class GuardedResolver(AbstractResolver):
    """Resolves names with ``base`` and refuses any answer that is not a public address."""

    def __init__(self, base: AbstractResolver | None = None) -> None:
        self._base = base or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._base.resolve(host, port, family)
        refused = [r["host"] for r in results if not is_public_address(r["host"])]
        if refused:
            raise PrivateAddressError(f"{host} resolves to non-public address {refused[0]}")
        return results

    async def close(self) -> None:
        await self._base.close()
