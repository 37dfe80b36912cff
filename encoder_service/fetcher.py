"""Fetches http(s) media with an SSRF guard.

Every hop (the first URL and each redirect) is checked: scheme, domain allow-list,
and every address the host resolves to. The connection then goes to the checked
address itself (Host header and TLS SNI keep the name), so a DNS answer that
changes between the check and the connect cannot point the request elsewhere.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from encoder_service.config import EncoderConfig
from encoder_service.errors import InvalidMedia, MediaForbidden

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

log = logging.getLogger(__name__)

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECTS = {301, 302, 303, 307, 308}


def is_public_address(ip: IPAddress) -> bool:
    """True for globally routable unicast addresses.

    Refuses private, loopback, link-local (which holds the 169.254.169.254 cloud
    metadata service), multicast, reserved, unspecified and shared (CGNAT) ranges,
    and IPv6 forms that embed such an IPv4 address (mapped, 6to4, Teredo, NAT64).
    """
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not is_public_address(embedded):
            return False
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True, slots=True)
class _Target:
    """One validated hop: where to connect and what name to present."""

    url: str
    hostname: str
    addresses: tuple[IPAddress, ...]


class HttpFetcher:
    """Downloads one URL into memory, under the configured limits."""

    def __init__(self, config: EncoderConfig) -> None:
        self._config = config
        self._timeout = httpx.Timeout(connect=config.http_connect_timeout_s,
                                      read=config.http_read_timeout_s,
                                      write=config.http_read_timeout_s,
                                      pool=config.http_connect_timeout_s)

    async def fetch(self, url: str) -> bytes:
        """Returns the response body, following at most `max_redirects` checked redirects."""
        try:
            return await asyncio.wait_for(self._follow(url), self._config.http_total_timeout_s)
        except asyncio.TimeoutError:
            raise InvalidMedia(f"fetching {_short(url)} took longer than "
                               f"{self._config.http_total_timeout_s:g}s; use a faster host or "
                               f"send the image bytes inline") from None

    async def _follow(self, url: str) -> bytes:
        for _ in range(self._config.max_redirects + 1):
            target = await self._check(url)
            body, location = await self._get(target)
            if location is None:
                return body
            url = urljoin(url, location)
        raise InvalidMedia(f"{_short(url)}: more than {self._config.max_redirects} redirects; "
                           f"send the final URL of the image")

    async def _check(self, url: str) -> _Target:
        if not self._config.allow_http:
            raise MediaForbidden("this encoder does not fetch http(s) URLs; send the image "
                                 "bytes inline or as a data: URL")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise MediaForbidden(f"redirect to a {parts.scheme}: URL refused; only http(s) "
                                 f"redirects are followed")
        if parts.username is not None or parts.password is not None:
            raise InvalidMedia(f"{_short(url)}: credentials in URLs are not supported")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise InvalidMedia(f"{_short(url)}: the URL has no host")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise InvalidMedia(f"{_short(url)}: invalid port") from None
        self._check_domain(host)
        addresses = await self._resolve(host, port)
        if not self._config.allow_private_networks:
            blocked = [str(a) for a in addresses if not is_public_address(a)]
            if blocked:
                # The addresses stay in the log: a client must not map internal DNS.
                log.info("refused %s: %s resolves to %s", _short(url), host, ", ".join(blocked))
                raise MediaForbidden(f"host {host!r} resolves to a non-public address; this "
                                     f"encoder only fetches from public addresses")
        return _Target(url=url, hostname=host, addresses=addresses)

    def _check_domain(self, host: str) -> None:
        allowed = self._config.allowed_domains
        if allowed and not any(host == d or host.endswith("." + d) for d in allowed):
            raise MediaForbidden(f"host {host!r} is not in the allowed domains "
                                 f"{list(allowed)}")

    async def _resolve(self, host: str, port: int) -> tuple[IPAddress, ...]:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise InvalidMedia(f"cannot resolve host {host!r}; check the URL") from None
        addresses = []
        for *_, sockaddr in infos:
            # Drop an IPv6 zone ("fe80::1%eth0") before parsing.
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if address not in addresses:
                addresses.append(address)
        return tuple(addresses)

    async def _get(self, target: _Target) -> tuple[bytes, str | None]:
        """Fetches one hop: (body, None), or (b"", location) for a redirect."""
        last_error: Exception | None = None
        for address in target.addresses:
            try:
                return await self._get_from(target, address)
            except httpx.ConnectError as exc:
                last_error = exc
            except httpx.HTTPError as exc:
                # One answer for refused, reset and timed out: the difference would tell a
                # client which ports are open behind the host.
                log.info("fetching %s failed: %r", _short(target.url), exc)
                raise InvalidMedia(_unreachable(target)) from None
        log.info("cannot connect to %s: %r", target.hostname, last_error)
        raise InvalidMedia(_unreachable(target))

    async def _get_from(self, target: _Target, address: IPAddress) -> tuple[bytes, str | None]:
        parts = urlsplit(target.url)
        literal = f"[{address}]" if address.version == 6 else str(address)
        netloc = literal if parts.port is None else f"{literal}:{parts.port}"
        pinned = parts._replace(netloc=netloc).geturl()
        headers = {"Host": parts.netloc, "Accept": "image/*"}
        # A client per hop: a pooled connection must never be reused for another host name.
        client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False, trust_env=False)
        async with client, client.stream("GET", pinned, headers=headers,
                                         extensions={"sni_hostname": target.hostname}) as response:
            if response.status_code in _REDIRECTS and "location" in response.headers:
                return b"", response.headers["location"]
            if response.status_code != 200:
                raise InvalidMedia(f"fetching {_short(target.url)} returned HTTP "
                                   f"{response.status_code}")
            return await self._read_capped(response, target.url), None

    async def _read_capped(self, response: httpx.Response, url: str) -> bytes:
        cap = self._config.max_media_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise InvalidMedia(f"{_short(url)} is {int(declared)} bytes; the limit is {cap} "
                               f"bytes; send a smaller image")
        body = bytearray()
        async for piece in response.aiter_bytes():
            body += piece
            if len(body) > cap:
                raise InvalidMedia(f"{_short(url)} is larger than the {cap}-byte limit; "
                                   f"send a smaller image")
        return bytes(body)


def _unreachable(target: _Target) -> str:
    return (f"cannot fetch {_short(target.url)}: the host did not answer in time or refused "
            f"the connection; check the URL or send the media inline")


def _short(url: str, limit: int = 120) -> str:
    """The URL as quoted in messages and logs: no user:password, query string or fragment,
    bounded length."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    shown = parts._replace(netloc=netloc, query="", fragment="").geturl()
    return shown if len(shown) <= limit else shown[:limit] + "..."
