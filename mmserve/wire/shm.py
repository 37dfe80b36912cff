"""Embedding rows on the same host: one file per item in a shared tmpfs directory.

An item's rows may travel as one file (`ShmRegion`) instead of in-band chunks, once the
caller's `ShmOffer` has proven that both sides see the same directory: the caller creates
a probe file holding a random token, the encoder reads it. The file holds the same
little-endian bytes as the chunks would.

Files are 0600: both services run as one user (the images use uid 10001), and nobody else
on the host reads embeddings or forges probes. The probe's creator holds a shared flock on
it for as long as it lives, so a sweeper that can take the lock knows the owner is gone
(also across PID namespaces, where a pid check would not work).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import stat
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable

import torch

from mmserve.wire.chunks import dtype_from_pb, int_view, wire_array
from protos import encoder_pb2

PROBE_PREFIX = "mmserve-probe-"
REGION_PREFIX = "mmserve-emb-"
PROBE_NAME = re.compile(PROBE_PREFIX + "[0-9a-f]{32}")
REGION_NAME = re.compile(REGION_PREFIX + "[0-9a-f]{32}")
PROBE_TOKEN_BYTES = 16
SHM_MIN_BYTES = 64 * 1024  # smaller items stay in-band
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK  # no symlinks; a FIFO cannot block
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
FILE_MODE = 0o600
# A probe this young may still be between its creation and its owner's lock.
PROBE_GRACE_S = 5.0
_held_probes: dict[str, int] = {}  # probe path -> the descriptor holding its lock

log = logging.getLogger(__name__)


def create_probe(directory: str) -> encoder_pb2.ShmOffer:
    """Creates `directory/mmserve-probe-<32 hex>` holding a random token; the offer naming it."""
    directory = os.path.normpath(directory)
    remove_dead_probes(directory)
    name, token = PROBE_PREFIX + uuid.uuid4().hex, secrets.token_bytes(PROBE_TOKEN_BYTES)
    path = os.path.join(directory, name)
    fd = os.open(path, _CREATE_FLAGS, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.write(fd, token)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    _held_probes[path] = fd  # kept open: the lock says "my owner is alive"
    return encoder_pb2.ShmOffer(dir=directory, probe_name=name, probe_token=token)


def remove_probe(offer: encoder_pb2.ShmOffer) -> None:
    path = os.path.join(offer.dir, offer.probe_name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = _held_probes.pop(path, None)
    if fd is not None:
        os.close(fd)


def remove_dead_probes(directory: str, min_age_s: float = PROBE_GRACE_S) -> int:
    """Unlinks probe files whose creator died (nobody holds their lock); returns how many.

    Files we may not remove (another user's, in a sticky /dev/shm) are left alone.
    """
    cutoff, removed = time.time() - min_age_s, 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if not PROBE_NAME.fullmatch(entry.name) or entry.path in _held_probes:
                continue
            try:
                fd = os.open(entry.path, _READ_FLAGS)
            except OSError:
                continue
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode) or info.st_mtime >= cutoff:
                    continue
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # locked: its owner is alive
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed += 1
            finally:
                os.close(fd)
    return removed


def probe_matches(directory: str, offer: encoder_pb2.ShmOffer) -> bool:
    """Whether `offer` names a probe file in `directory` (a plain file) holding its token."""
    if not PROBE_NAME.fullmatch(offer.probe_name) or \
            len(offer.probe_token) != PROBE_TOKEN_BYTES:
        return False
    try:
        fd = os.open(os.path.join(directory, offer.probe_name), _READ_FLAGS)
        with open(fd, "rb", buffering=0) as file:
            return stat.S_ISREG(os.fstat(fd).st_mode) and \
                file.read(PROBE_TOKEN_BYTES + 1) == offer.probe_token
    except OSError:
        return False


class ShmOffers:
    """The encoder's side of the negotiation: accepts an offer only for its own directory
    and a probe it could read; remembers the probes it has proven (a bounded number)."""

    def __init__(self, directory: str, max_known: int = 256) -> None:
        self.directory = os.path.normpath(directory) if directory else ""
        self._max_known = max_known
        self._proven: OrderedDict[str, bytes] = OrderedDict()

    def accept(self, offer: encoder_pb2.ShmOffer) -> bool:
        if not self.directory or not offer.dir or \
                os.path.normpath(offer.dir) != self.directory:
            return False
        known = self._proven.get(offer.probe_name)
        if known is not None:
            self._proven.move_to_end(offer.probe_name)
            return known == offer.probe_token
        if not probe_matches(self.directory, offer):
            return False
        self._proven[offer.probe_name] = offer.probe_token
        if len(self._proven) > self._max_known:
            self._proven.popitem(last=False)
        return True


def new_region_name() -> str:
    return REGION_PREFIX + uuid.uuid4().hex


def write_region(directory: str, name: str, tensor: torch.Tensor) -> encoder_pb2.ShmRegion:
    """Writes [rows, hidden] completely into the new file `directory/name`."""
    array = wire_array(tensor)
    path = os.path.join(directory, name)
    fd = os.open(path, _CREATE_FLAGS, FILE_MODE)
    try:
        with open(fd, "wb") as file:
            file.write(array.data)  # C-contiguous: its buffer, without a copy
    except BaseException:
        remove_regions(directory, [name])
        raise
    return encoder_pb2.ShmRegion(name=name, nbytes=array.nbytes)


def remove_regions(directory: str, names: Iterable[str]) -> None:
    """Unlinks region files; ones already gone are fine."""
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))


def remove_stale_regions(directory: str, max_age_s: float) -> int:
    """Unlinks region files older than `max_age_s` (left by callers that went away)."""
    cutoff, removed = time.time() - max_age_s, 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if not REGION_NAME.fullmatch(entry.name):
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
    return removed


def read_region(directory: str, header: encoder_pb2.ItemHeader,
                region: encoder_pb2.ShmRegion) -> torch.Tensor:
    """An item's rows from `directory/region.name`, which is unlinked whatever happens.

    A name other than mmserve-emb-<32 hex> is refused without touching anything.
    """
    if not REGION_NAME.fullmatch(region.name):
        raise ValueError(f"refusing shared-memory region name {region.name!r}")
    path = os.path.join(directory, region.name)
    try:
        dtype = dtype_from_pb(header.dtype)
        ints = torch.empty((header.num_tokens, header.hidden_size), dtype=int_view(dtype)[0])
        if region.nbytes != ints.nbytes:
            raise ValueError(f"region has {region.nbytes} bytes, the header says "
                             f"{header.num_tokens} x {header.hidden_size} x "
                             f"{ints.element_size()} = {ints.nbytes}")
        fd = os.open(path, _READ_FLAGS)
        with open(fd, "rb", buffering=0) as file:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size != ints.nbytes:
                raise ValueError(f"{path} is not a plain file of {ints.nbytes} bytes")
            view, filled = memoryview(ints.numpy()).cast("B"), 0
            while filled < ints.nbytes:
                count = file.readinto(view[filled:])
                if not count:
                    raise ValueError(f"{path} ended after {filled} of {ints.nbytes} bytes")
                filled += count
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove shared-memory region %s: %s", path, exc)
    if sys.byteorder != "little":
        ints.numpy().byteswap(inplace=True)
    return ints.view(dtype)
