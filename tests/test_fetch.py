"""fetch_with_deadline on its own: the SSRF guard on URL literals and on every redirect hop, and
how DNS failures are told apart and retried.

Every server is a LoopbackServer on 127.0.0.1, every name resolves through a stub in this file
(the system resolver is never asked), and a tripwire fails any connection to an address other
than loopback before a packet is sent: a guard that lets a test address through shows up as a
failed test, never as traffic.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Iterator

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from conftest import LoopbackServer, make_image
from vlmdata.pipeline import address_guard
from vlmdata.pipeline.fetch import (
    RETRYABLE_KINDS,
    FetchPolicy,
    FetchResult,
    RequestLimiter,
    fetch_with_deadline,
    open_session,
)

JPEG = make_image(32, 32)
LOOPBACK = frozenset({"127.0.0.1", "::1"})
# How each resolver failure looks: getaddrinfo raises socket.gaierror, other resolvers OSError.
EAI_AGAIN = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
EAI_NONAME = socket.gaierror(socket.EAI_NONAME, "Name or service not known")

Outcome = str | OSError  # an address to answer with, or the error to raise


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list]:
    """Refuse, without sending anything, every connection to an address other than loopback.

    asyncio (and aiohappyeyeballs under aiohttp) connect through ``socket.socket.connect``;
    each refused attempt is recorded, and the test fails if there was any.
    """
    attempts: list = []
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: tuple) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            attempts.append(address)
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"tripwire: {address[0]}")
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    yield attempts
    assert not attempts, f"a connection to a non-loopback address was attempted: {attempts}"


class ScriptedResolver(AbstractResolver):
    """Answers each name from a script of outcomes, one per lookup (the last one repeats).

    A name without a script does not exist (EAI_NONAME, as getaddrinfo says it).
    """

    def __init__(self, script: dict[str, list[Outcome]]) -> None:
        self.script = {name: list(outcomes) for name, outcomes in script.items()}
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        outcomes = self.script.get(host, [EAI_NONAME])
        outcome = outcomes.pop(0) if len(outcomes) > 1 else outcomes[0]
        if isinstance(outcome, OSError):
            raise outcome
        kind = socket.AF_INET6 if ":" in outcome else socket.AF_INET
        return [{"hostname": host, "host": outcome, "port": port, "family": kind,
                 "proto": 0, "flags": socket.AI_NUMERICHOST}]  # fmt: skip

    async def close(self) -> None:
        pass


def fetch(url: str, resolver: AbstractResolver, **policy: object) -> FetchResult:
    """One fetch_with_deadline in a session of its own."""
    settings = FetchPolicy(**{"timeout": 5.0, "retries": 2, "backoff_s": 0.01, **policy})

    async def run() -> FetchResult:
        async with open_session(settings, 4, resolver) as session:
            return await fetch_with_deadline(session, url, settings, RequestLimiter(4, 4))

    return asyncio.run(run())


def test_the_tripwire_refuses_other_addresses_without_connecting(loopback_only):
    async def connect_to_another_loopback_address() -> None:
        with socket.socket() as sock:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.2", 9))

    with pytest.raises(ConnectionRefusedError, match="tripwire"):
        asyncio.run(connect_to_another_loopback_address())
    assert loopback_only == [("127.0.0.2", 9)]
    loopback_only.clear()  # expected here: the fixture must not fail this test


# URL hosts that are IP literals of a non-public address, in the forms a resolver would accept.
PRIVATE_LITERAL_HOSTS = [
    "2130706433", "0x7f000001", "017700000001", "0177.0.0.1", "0x7f.1", "0x7F.0.0.1", "127.1",
    "127.0.0.1.", "0", "10.1", "169.254.169.254", "[64:ff9b::7f00:1]", "[64:ff9b::127.0.0.1]",
    "[64:ff9b::a9fe:a9fe]", "[64:ff9b:1::808:808]", "[::ffff:127.0.0.1]", "[::ffff:0:7f00:1]",
    "[::127.0.0.1]", "[2002:7f00:1::1]", "[2001:0:4136:e378:8000:63bf:3fff:fdd2]", "[fec0::1]",
    "[fd00::1]", "[::1]",
]  # fmt: skip


@pytest.mark.parametrize("host", PRIVATE_LITERAL_HOSTS)
def test_private_literal_hosts_are_refused_without_a_lookup_or_a_connection(server, host):
    server.add_file("a.jpg", JPEG)
    resolver = ScriptedResolver({})
    result = fetch(f"http://{host}:{server.port}/img/a.jpg", resolver)
    assert (result.error_kind, result.body) == ("private_address", None), result
    assert resolver.asked == []  # refused as a literal, not by the resolver
    assert server.total_hits() == 0


@pytest.fixture
def loopback_counts_as_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the resolver guard pass 127.0.0.1, so that the loopback server can stand for a public
    web server behind a name while the guard stays on: what is tested is what the guard makes
    of the hops after it. Every other address is judged as usual."""
    judge = address_guard.is_public_address
    monkeypatch.setattr(
        address_guard, "is_public_address", lambda address: address == "127.0.0.1" or judge(address)
    )


def redirecting_server(location: str) -> LoopbackServer:
    """A loopback server whose /redirect answers 302 to ``location`` ({port}: its own port)."""
    server = LoopbackServer()

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(location.format(port=server.port))

    server.route("/redirect", redirect)  # routes must exist before the server starts
    server.files["a.jpg"] = (JPEG, "image/jpeg")
    return server


NAMES = {
    "origin.test": ["127.0.0.1"],  # the "public" server (see loopback_counts_as_public)
    "nat64.test": ["64:ff9b::7f00:1"],
    "nat64-metadata.test": ["64:ff9b::a9fe:a9fe"],
    "six-to-four.test": ["2002:7f00:1::1"],
    "siit.test": ["::ffff:0:7f00:1"],
    "compatible.test": ["::7f00:1"],
    "local-use-nat64.test": ["64:ff9b:1::808:808"],
    "teredo.test": ["2001:0:4136:e378:8000:63bf:3fff:fdd2"],
}


@pytest.mark.usefixtures("loopback_counts_as_public")
@pytest.mark.parametrize(
    "location",
    ["http://[64:ff9b::7f00:1]:{port}/img/a.jpg", "http://[64:ff9b::127.0.0.1]:{port}/img/a.jpg",
     "http://2130706433:{port}/img/a.jpg", "http://0x7f.1:{port}/img/a.jpg",
     "http://[2002:7f00:1::1]:{port}/img/a.jpg", "http://[::ffff:0:7f00:1]:{port}/img/a.jpg",
     "http://nat64.test:{port}/img/a.jpg", "http://nat64-metadata.test/latest/meta-data/",
     "http://six-to-four.test:{port}/img/a.jpg", "http://siit.test:{port}/img/a.jpg",
     "http://compatible.test:{port}/img/a.jpg", "http://local-use-nat64.test/img/a.jpg",
     "http://teredo.test/img/a.jpg"],
)  # fmt: skip
def test_a_redirect_to_an_address_that_leads_to_private_ipv4_is_refused(location):
    with redirecting_server(location) as server:
        result = fetch(f"http://origin.test:{server.port}/redirect", ScriptedResolver(NAMES))
        assert (result.error_kind, result.body) == ("private_address", None), result
        assert server.hits["/redirect"] == 1
        assert server.total_hits("/img/") == 0


@pytest.mark.usefixtures("loopback_counts_as_public")
def test_a_redirect_to_a_public_destination_is_followed():
    """The control for the test above: with the guard on, a redirect to the "public" name is
    followed to the image."""
    with redirecting_server("http://origin.test:{port}/img/a.jpg") as server:
        result = fetch(f"http://origin.test:{server.port}/redirect", ScriptedResolver(NAMES))
        assert (result.error_kind, result.body) == (None, JPEG), result
        assert server.hits["/img/a.jpg"] == 1


@pytest.mark.parametrize(
    "failure",
    [EAI_AGAIN, OSError(socket.EAI_AGAIN, "Temporary failure in name resolution")],
    ids=["gaierror", "oserror"],
)
def test_a_temporary_dns_failure_is_retried(server, failure):
    server.add_file("a.jpg", JPEG)
    resolver = ScriptedResolver({"flaky-dns.test": [failure, "127.0.0.1"]})
    result = fetch(
        f"http://flaky-dns.test:{server.port}/img/a.jpg", resolver, allow_private_network=True
    )
    assert (result.error_kind, result.body, result.attempts) == (None, JPEG, 2), result
    assert resolver.asked == ["flaky-dns.test", "flaky-dns.test"]


def test_a_dns_failure_that_lasts_is_dns_temporary_after_every_attempt(server):
    resolver = ScriptedResolver({"down-dns.test": [EAI_AGAIN]})
    result = fetch(
        f"http://down-dns.test:{server.port}/img/a.jpg", resolver, allow_private_network=True
    )
    assert (result.error_kind, result.attempts) == ("dns_temporary", 3), result
    assert "Temporary failure" in result.error
    assert "dns_temporary" in RETRYABLE_KINDS


def test_a_name_that_does_not_exist_is_dns_and_not_retried(server):
    resolver = ScriptedResolver({})
    result = fetch(f"http://nowhere.test:{server.port}/img/a.jpg", resolver)
    assert (result.error_kind, result.attempts) == ("dns", 1), result
    assert resolver.asked == ["nowhere.test"]
    assert "dns" not in RETRYABLE_KINDS
