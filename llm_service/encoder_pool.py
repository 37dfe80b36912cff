"""The encoder replicas one LLM service calls: which are up, and which one gets an item.

Endpoints come from the encoder address: a comma-separated list of host:port, where a
`dns:///name:port` entry stands for every address the name resolves to (a headless
Kubernetes Service), resolved again every `resolve_interval_s` so replicas that come and go
are picked up. A health check with a timeout runs against every endpoint; one that fails
it, or whose call fails as if it were down, is ejected for `eject_s` and checked again
later. Calls waiting on an endpoint when it is ejected are told at once (its `ejected`
event), so a hung replica costs a request one health interval, not its whole budget.

Placement: an item with a routing key (a handle's digest, or the hash of its bytes) goes to
the endpoint that owns the key on a consistent-hash ring of the healthy endpoints, so
turn 2 of a conversation meets turn 1's embeddings; when that endpoint is out, the next one
on the ring takes it. Items without a key spread round-robin, as before.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import itertools
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import encoder_pb2_grpc

log = logging.getLogger(__name__)
_DNS = "dns:///"
VIRTUAL_NODES = 64  # ring points per endpoint: keys spread within a few % of evenly


@dataclass(frozen=True, slots=True)
class PoolSettings:
    health_interval_s: float = 2.0
    health_timeout_s: float = 1.0
    eject_s: float = 5.0  # a failed call keeps its endpoint out at least this long
    resolve_interval_s: float = 10.0
    affinity: bool = True  # False: every item round-robin (the benchmark's baseline)


@dataclass(eq=False)
class Endpoint:
    """One encoder replica and what the pool knows about it."""

    address: str
    channel: grpc.aio.Channel
    stub: encoder_pb2_grpc.EncoderStub
    health: health_pb2_grpc.HealthStub
    ejected_until: float = 0.0
    check_failed: str = ""  # why the last health check failed; "" when it passed
    ejected: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def up(self) -> bool:
        return not self.check_failed and time.monotonic() >= self.ejected_until

    def eject(self, reason: str, for_s: float) -> None:
        if self.up:
            log.warning("encoder %s ejected: %s", self.address, reason)
        self.ejected_until = max(self.ejected_until, time.monotonic() + for_s)
        self.ejected.set()

    def restore(self) -> None:
        if self.ejected.is_set() and self.up:
            log.info("encoder %s is back", self.address)
            self.ejected = asyncio.Event()


ChannelFactory = Callable[[str, Sequence[tuple[str, Any]]], grpc.aio.Channel]


class EncoderPool:
    """Endpoints, their health and the ring; `start()` runs the checks in the background."""

    def __init__(self, target: str, make_channel: ChannelFactory,
                 settings: PoolSettings | None = None) -> None:
        self._entries = [a.strip() for a in target.split(",") if a.strip()]
        if not self._entries:
            raise ValueError("encoder address must not be empty")
        self._make_channel = make_channel
        self.settings = settings or PoolSettings()
        self._endpoints: dict[str, Endpoint] = {}
        self._ring: list[tuple[int, str]] = []
        self._ring_members: tuple[str, ...] = ()
        self._next = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._resolved_at = 0.0
        # Until the first resolution, a dns:/// entry is one endpoint that gRPC resolves.
        self._set_addresses(self._entries)

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints.values())

    @property
    def healthy(self) -> bool:
        return any(e.up for e in self._endpoints.values())

    def describe(self) -> str:
        """Every endpoint's state, for errors and logs."""
        return ", ".join(f"{e.address} {'up' if e.up else 'down: ' + (e.check_failed or 'ejected')}"
                         for e in self._endpoints.values())

    async def start(self) -> None:
        await self.resolve()
        self._task = asyncio.create_task(self._watch())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*(e.channel.close() for e in self._endpoints.values()))

    def pick(self, key: str | None, tried: set[str]) -> Endpoint | None:
        """The endpoint for an item: the key's owner on the ring of healthy endpoints (or the
        next one up), else round-robin; None when no untried endpoint is up."""
        self._rebuild_ring()
        chosen: Endpoint | None = None
        if key is not None and self.settings.affinity and self._ring:
            start = bisect.bisect(self._ring, (_point(key), ""))
            for k in range(len(self._ring)):
                endpoint = self._endpoints[self._ring[(start + k) % len(self._ring)][1]]
                if endpoint.up and endpoint.address not in tried:
                    chosen = endpoint
                    break
        else:
            candidates = [e for e in self._endpoints.values()
                          if e.up and e.address not in tried]
            chosen = candidates[next(self._next) % len(candidates)] if candidates else None
        if chosen is not None:
            chosen.restore()  # its ejection may have run out since the last health check
        return chosen

    def eject(self, endpoint: Endpoint, reason: str) -> None:
        endpoint.eject(reason, self.settings.eject_s)

    async def resolve(self) -> None:
        """Re-reads the endpoint list (DNS names expanded); keeps the state of known ones."""
        self._resolved_at = time.monotonic()
        addresses: list[str] = []
        for entry in self._entries:
            if not entry.startswith(_DNS):
                addresses.append(entry)
                continue
            host, _, port = entry[len(_DNS):].rpartition(":")
            try:
                infos = await asyncio.to_thread(socket.getaddrinfo, host, int(port),
                                                type=socket.SOCK_STREAM)
            except (OSError, ValueError) as exc:
                log.warning("cannot resolve encoder address %s: %s", entry, exc)
                addresses.extend(a for a in self._endpoints if a.startswith(f"{host}="))
                continue
            for info in infos:
                ip = str(info[4][0])
                addresses.append(f"{host}=[{ip}]:{port}" if ":" in ip else f"{host}={ip}:{port}")
        if addresses:
            self._set_addresses(list(dict.fromkeys(addresses)))

    def _set_addresses(self, addresses: list[str]) -> None:
        for gone in set(self._endpoints) - set(addresses):
            endpoint = self._endpoints.pop(gone)
            endpoint.eject("no longer resolved", self.settings.eject_s)
            asyncio.get_running_loop().create_task(endpoint.channel.close(grace=30))
        for address in addresses:
            if address not in self._endpoints:
                self._endpoints[address] = self._endpoint(address)

    def _endpoint(self, address: str) -> Endpoint:
        """`name=ip:port` (a resolved DNS entry) connects to ip with `name` as the authority
        and TLS name; anything else is a gRPC target as it stands."""
        options: list[tuple[str, Any]] = []
        name, sep, target = address.partition("=")
        if sep:
            options = [("grpc.default_authority", name), ("grpc.ssl_target_name_override", name)]
        else:
            target = address
        channel = self._make_channel(target, options)
        return Endpoint(address, channel, encoder_pb2_grpc.EncoderStub(channel),
                        health_pb2_grpc.HealthStub(channel))

    def _rebuild_ring(self) -> None:
        members = tuple(sorted(a for a, e in self._endpoints.items() if e.up))
        if members == self._ring_members:
            return
        self._ring_members = members
        self._ring = sorted((_point(f"{address}#{k}"), address)
                            for address in members for k in range(VIRTUAL_NODES))

    async def _watch(self) -> None:
        settings = self.settings
        while True:
            if time.monotonic() - self._resolved_at >= settings.resolve_interval_s:
                await self.resolve()
            await asyncio.gather(*(self._check(e) for e in self.endpoints))
            await asyncio.sleep(settings.health_interval_s)

    async def _check(self, endpoint: Endpoint) -> None:
        timeout = self.settings.health_timeout_s
        try:
            reply = await endpoint.health.Check(health_pb2.HealthCheckRequest(service=""),
                                                timeout=timeout)
            failed = ("" if reply.status == health_pb2.HealthCheckResponse.SERVING
                      else "reports NOT_SERVING")
        except grpc.aio.AioRpcError as exc:
            failed = (f"health check timed out after {timeout:g} s"
                      if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                      else f"health check failed: {exc.code().name}")
        if failed:
            if endpoint.up:
                log.warning("encoder %s ejected: %s", endpoint.address, failed)
            endpoint.check_failed = failed
            endpoint.ejected.set()
        else:
            endpoint.check_failed = ""
            endpoint.restore()


def _point(value: str) -> int:
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "big")
