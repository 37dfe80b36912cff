"""The encoder's shared-memory regions: a byte quota on what is outstanding, and the sweeps.

A region is outstanding from the moment the encoder writes it until the caller reads it
(the reader unlinks it). A caller that offers shared memory and never reads would fill the
tmpfs, so the encoder counts the bytes it has written and not seen taken; over the quota an
item goes in-band instead. Regions older than `stale_s`, and probes whose owner died, are
swept in the background.
"""

from __future__ import annotations

import asyncio
import logging
import os

import torch

from mmserve.wire.shm import (
    SHM_MIN_BYTES,
    new_region_name,
    remove_dead_probes,
    remove_regions,
    remove_stale_regions,
    write_region,
)
from protos import encoder_pb2

log = logging.getLogger(__name__)


class RegionPool:
    """Writes region files under a quota of outstanding bytes, and sweeps the directory."""

    def __init__(self, directory: str, quota_bytes: int, stale_s: float) -> None:
        self.directory = directory
        self.quota_bytes = quota_bytes
        self.stale_s = stale_s
        self._outstanding: dict[str, int] = {}  # name -> bytes, written and not seen taken
        self._task: asyncio.Task[None] | None = None

    @property
    def outstanding_bytes(self) -> int:
        return sum(self._outstanding.values())

    def write(self, embeddings: torch.Tensor, regions: list[str]) -> encoder_pb2.ShmRegion | None:
        """The rows as a new region file (its name appended to `regions`), or None: send
        them in-band (small, over the quota, or the write failed)."""
        nbytes = embeddings.numel() * embeddings.element_size()
        if nbytes < SHM_MIN_BYTES or not self._reserve(nbytes):
            return None
        name = new_region_name()
        regions.append(name)
        try:
            region = write_region(self.directory, name, embeddings)
        except OSError as exc:
            log.warning("cannot write %s in %s, sending in-band: %s", name, self.directory, exc)
            return None
        self._outstanding[name] = nbytes
        return region

    def discard(self, names: list[str]) -> None:
        """Removes regions of a call that did not end well."""
        remove_regions(self.directory, names)
        for name in names:
            self._outstanding.pop(name, None)

    def _reserve(self, nbytes: int) -> bool:
        if self.outstanding_bytes + nbytes <= self.quota_bytes:
            return True
        self._forget_taken()
        if self.outstanding_bytes + nbytes <= self.quota_bytes:
            return True
        log.warning("shared-memory quota: %d bytes outstanding, %d more would pass %d; "
                    "sending in-band", self.outstanding_bytes, nbytes, self.quota_bytes)
        return False

    def _forget_taken(self) -> None:
        """Drops the regions whose files are gone (taken by the caller, or swept)."""
        for name in list(self._outstanding):
            if not os.path.lexists(os.path.join(self.directory, name)):
                del self._outstanding[name]

    def sweep(self) -> None:
        """Removes stale regions and dead callers' probes; forgets what is gone."""
        try:
            removed = remove_stale_regions(self.directory, self.stale_s)
            probes = remove_dead_probes(self.directory)
        except OSError as exc:
            log.warning("cannot sweep %s: %s", self.directory, exc)
            return
        if removed or probes:
            log.info("swept %d unread regions and %d dead probes from %s",
                     removed, probes, self.directory)
        self._forget_taken()

    def start(self) -> None:
        if self.directory and self._task is None:
            self._task = asyncio.create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _sweep_forever(self) -> None:
        interval = max(0.05, min(self.stale_s / 2, 30.0))
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(self.sweep)
