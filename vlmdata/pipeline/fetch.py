"""Fetch one URL from the hostile web: a total deadline per attempt, a byte cap, redirects
followed by hand (every hop is checked), retries with backoff and jitter that honour
``Retry-After``, and ``X-Robots-Tag: noai`` opt-outs.

Every failure comes back as a :class:`FetchResult` with a machine-readable ``error_kind``;
nothing a server does raises out of :func:`fetch_with_deadline`.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver
from yarl import URL

from vlmdata import __version__
from vlmdata.pipeline.address_guard import (
    GuardedResolver,
    PrivateAddressError,
    ip_literal,
    is_public_address,
)

# Failures worth another attempt: the same request may well succeed a little later.
RETRYABLE_KINDS = frozenset(
    {"timeout", "connection", "dns_temporary", "truncated", "http_429", "http_5xx"}
)
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai"})
# X-Robots-Tag directives that carry a value after a colon (so the colon is no user agent).
_VALUED_DIRECTIVES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class FetchPolicy:
    """How hard to try one URL and what to refuse."""

    timeout: float = 20.0  # seconds for a whole attempt: connect, redirects, headers, body
    retries: int = 2  # extra attempts after a retryable failure
    max_bytes: int = 20_000_000
    max_redirects: int = 10
    allow_private_network: bool = False
    ignore_noai: bool = False
    user_agent_token: str | None = None
    backoff_s: float = 0.5  # first retry waits about this long, then doubles
    max_retry_after_s: float = 30.0  # never park a URL longer than this for a Retry-After

    @property
    def user_agent(self) -> str:
        token = f"; {self.user_agent_token}" if self.user_agent_token else ""
        return f"Mozilla/5.0 (compatible; vlmdata/{__version__}{token})"

    @property
    def robots_tokens(self) -> frozenset[str]:
        """User-agent names whose X-Robots-Tag directives apply to us."""
        names = {"vlmdata", "*"}
        if self.user_agent_token:
            names.add(self.user_agent_token.lower())
        return frozenset(names)


@dataclass
class FetchResult:
    """What came of one URL: the body, or an error kind and message."""

    body: bytes | None = None
    error_kind: str | None = None
    error: str | None = None
    http_status: int | None = None
    content_type: str | None = None
    final_url: str | None = None
    attempts: int = 0
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error_kind is None


class FetchFailure(Exception):
    """One attempt failed in a way we can name."""

    def __init__(
        self,
        kind: str,
        message: str,
        http_status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.http_status = http_status
        self.retry_after = retry_after


class RequestLimiter:
    """A global limit on requests in flight plus one per host.

    Host entries exist only while a request to that host is pending, so millions of distinct
    hosts in a URL list cost no memory once they are done.
    """

    def __init__(self, concurrency: int, per_host: int) -> None:
        self._all = asyncio.Semaphore(concurrency)
        self._per_host = per_host
        self._hosts: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @asynccontextmanager
    async def slot(self, host: str) -> AsyncIterator[None]:
        sem, users = self._hosts.get(host, (None, 0))
        sem = sem or asyncio.Semaphore(self._per_host)
        self._hosts[host] = (sem, users + 1)
        try:
            # Host first: a request queued behind a busy host must not hold a global slot.
            async with sem, self._all:
                yield
        finally:
            sem, users = self._hosts[host]
            if users == 1:
                del self._hosts[host]
            else:
                self._hosts[host] = (sem, users - 1)


def open_session(
    policy: FetchPolicy, concurrency: int, resolver: AbstractResolver | None = None
) -> aiohttp.ClientSession:
    """An aiohttp session set up for bulk fetching under ``policy``.

    ``resolver`` replaces the system resolver (the SSRF guard wraps it unless private
    networks are allowed).
    """
    base = resolver or DefaultResolver()
    connector = aiohttp.TCPConnector(
        limit=concurrency,
        limit_per_host=0,  # RequestLimiter enforces the per-host limit across redirects
        ttl_dns_cache=300,
        resolver=base if policy.allow_private_network else GuardedResolver(base),
        enable_cleanup_closed=True,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=policy.timeout),
        headers={"User-Agent": policy.user_agent, "Accept": "image/*,*/*;q=0.8"},
        cookie_jar=aiohttp.DummyCookieJar(),  # a jar would grow with every host visited
        trust_env=False,
    )


async def fetch_with_deadline(
    session: aiohttp.ClientSession, url: str | None, policy: FetchPolicy, limiter: RequestLimiter
) -> FetchResult:
    """Fetch ``url``, retrying retryable failures; never raises for anything the web does."""
    started = time.monotonic()
    result = FetchResult()
    try:
        target = parse_http_url(url)
        _check_destination(target, policy)  # junk and private URLs fail without a slot
    except FetchFailure as failure:
        return _failed(result, failure, started)
    for attempt in range(policy.retries + 1):
        result.attempts = attempt + 1
        try:
            async with limiter.slot(target.host or ""), asyncio.timeout(policy.timeout):
                return await _fetch_once(session, target, policy, result, started)
        except TimeoutError:
            failure = FetchFailure("timeout", f"no complete response within {policy.timeout:g} s")
        except FetchFailure as f:
            failure = f
        except aiohttp.ClientError as e:
            failure = _classify_client_error(e)
        except (ValueError, UnicodeError) as e:  # yarl/aiohttp on URLs they cannot encode
            failure = FetchFailure("invalid_url", str(e) or type(e).__name__)
        if failure.kind not in RETRYABLE_KINDS or attempt == policy.retries:
            return _failed(result, failure, started)
        await asyncio.sleep(_retry_delay(policy, attempt, failure.retry_after))
    raise AssertionError("unreachable: the last attempt always returns")


def parse_http_url(url: str | None) -> URL:
    """Parse and check a URL from the input: http(s), with a host, nothing else."""
    if url is None or not url.strip():
        raise FetchFailure("invalid_url", "empty URL")
    try:
        parsed = URL(url.strip())
    except (ValueError, TypeError, UnicodeError) as e:
        raise FetchFailure("invalid_url", f"unparseable URL: {e}") from None
    if parsed.scheme not in ("http", "https"):
        raise FetchFailure("invalid_url", f"not an http(s) URL: scheme {parsed.scheme or 'none'!r}")
    if not parsed.host:
        raise FetchFailure("invalid_url", "URL has no host")
    return parsed


def is_opted_out(robots_tags: list[str], tokens: frozenset[str]) -> bool:
    """True when an ``X-Robots-Tag`` value forbids AI use for one of our user-agent tokens.

    ``noai`` applies to everyone; ``otherbot: noai`` applies only to otherbot.
    """
    for value in robots_tags:
        agent, colon, rest = value.partition(":")
        agent = agent.strip().lower()
        if colon and agent not in _VALUED_DIRECTIVES and "," not in agent:
            if agent not in tokens:
                continue
            value = rest
        directives = {d.strip().lower() for d in value.split(",")}
        if directives & OPT_OUT_DIRECTIVES:
            return True
    return False


async def _fetch_once(
    session: aiohttp.ClientSession,
    url: URL,
    policy: FetchPolicy,
    result: FetchResult,
    started: float,
) -> FetchResult:
    seen = {url}  # the first URL was checked by the caller; every hop after it is checked here
    for _ in range(policy.max_redirects + 1):
        async with session.get(url, allow_redirects=False) as response:
            if response.status in _REDIRECT_STATUSES:
                url = _redirect_target(response, url)
                if url in seen:
                    raise FetchFailure(
                        "redirect_loop", f"redirect loop back to {url}", response.status
                    )
                seen.add(url)
                _check_destination(url, policy)
                continue
            if response.status >= 400:
                raise _http_failure(response)
            if not policy.ignore_noai and is_opted_out(
                response.headers.getall("X-Robots-Tag", []), policy.robots_tokens
            ):
                raise FetchFailure("opted_out", "X-Robots-Tag opts out of AI use", response.status)
            result.body = await _read_capped(response, policy.max_bytes)
            result.http_status = response.status
            result.content_type = response.headers.get("Content-Type")
            result.final_url = str(url)
            result.elapsed_s = time.monotonic() - started
            return result
    raise FetchFailure("too_many_redirects", f"more than {policy.max_redirects} redirects")


def _check_destination(url: URL, policy: FetchPolicy) -> None:
    """Refuse IP-literal hosts outside the public internet (names are checked by the resolver)."""
    if url.scheme not in ("http", "https"):
        raise FetchFailure("invalid_url", f"redirect to a non-http(s) URL: {url.scheme!r}")
    address = ip_literal(url.host or "")
    if address and not policy.allow_private_network and not is_public_address(address):
        raise FetchFailure("private_address", f"refused non-public address {address}")


def _redirect_target(response: aiohttp.ClientResponse, url: URL) -> URL:
    location = response.headers.get("Location")
    if not location:
        raise FetchFailure("http_3xx", "redirect without a Location header", response.status)
    try:
        return url.join(URL(location))
    except (ValueError, UnicodeError) as e:
        raise FetchFailure("invalid_url", f"bad redirect Location: {e}", response.status) from None


async def _read_capped(response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """The body, or too_large as soon as more than ``max_bytes`` arrive (reading stops there)."""
    declared = response.content_length
    if declared is not None and declared > max_bytes:
        raise FetchFailure(
            "too_large", f"Content-Length {declared} > --max-bytes {max_bytes}", response.status
        )
    chunks = []
    size = 0
    # Counted after decompression, so a gzip bomb is capped like any other body.
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > max_bytes:
            raise FetchFailure(
                "too_large", f"body exceeds --max-bytes {max_bytes}", response.status
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _http_failure(response: aiohttp.ClientResponse) -> FetchFailure:
    status = response.status
    message = f"HTTP {status} {response.reason or ''}".strip()
    if status == 429:
        return FetchFailure("http_429", message, status, _retry_after(response))
    if status == 408:
        return FetchFailure("timeout", message, status)
    if status >= 500:
        return FetchFailure("http_5xx", message, status, _retry_after(response))
    return FetchFailure("http_4xx", message, status)


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    """Seconds asked for by a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _retry_delay(policy: FetchPolicy, attempt: int, retry_after: float | None) -> float:
    # Jitter spreads retries so a recovering host is not hit by a synchronised wave.
    backoff = policy.backoff_s * (2**attempt) * random.uniform(0.5, 1.5)
    if retry_after is not None:
        backoff = max(backoff, retry_after)
    return min(backoff, policy.max_retry_after_s)


def _classify_client_error(error: aiohttp.ClientError) -> FetchFailure:
    message = str(error) or type(error).__name__
    if isinstance(error, aiohttp.ClientConnectorDNSError):
        return _classify_dns_error(error.os_error, message)
    if isinstance(error, aiohttp.ClientSSLError):
        return FetchFailure("tls", message)
    if isinstance(error, aiohttp.ClientPayloadError):
        return FetchFailure("truncated", message)
    if isinstance(error, aiohttp.InvalidURL):
        return FetchFailure("invalid_url", message)
    if isinstance(error, aiohttp.ClientResponseError):
        return FetchFailure("bad_response", message, error.status or None)
    return FetchFailure("connection", message)


def _classify_dns_error(error: OSError, message: str) -> FetchFailure:
    """``dns`` when the name does not resolve, ``dns_temporary`` when no answer came.

    getaddrinfo says EAI_AGAIN when the DNS servers failed to answer (a timeout, a SERVFAIL):
    the same name may well resolve a moment later, so that one is retried. A name that does
    not exist (EAI_NONAME, NXDOMAIN) will not exist on the next attempt either.
    """
    if isinstance(error, PrivateAddressError):
        return FetchFailure("private_address", str(error))
    if error.errno == socket.EAI_AGAIN:
        return FetchFailure("dns_temporary", message)
    return FetchFailure("dns", message)


def _failed(result: FetchResult, failure: FetchFailure, started: float) -> FetchResult:
    result.body = None
    result.error_kind = failure.kind
    result.error = str(failure)
    result.http_status = failure.http_status
    result.elapsed_s = time.monotonic() - started
    return result
