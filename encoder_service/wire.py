"""Embedding rows on the wire, shared by the encoder (sender) and the LLM service (receiver).

An item's rows travel as `EmbeddingChunk`s after its `ItemHeader`: consecutive row
ranges, each a little-endian byte string of `num_rows * hidden_size` elements of
the header's dtype, each small enough for gRPC's default 4 MiB message limit.

On the same host they may instead travel as one file in a shared tmpfs directory
(`ShmRegion`), once the caller's `ShmOffer` has proven that both sides see the same
directory: the caller creates a probe file holding a random token, the encoder reads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import stat
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from protos.stubs import load

common_pb2 = load("common_pb2")
encoder_pb2 = load("encoder_pb2")

_BY_NAME = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TO_PB = {
    torch.float32: common_pb2.DTYPE_FLOAT32,
    torch.float16: common_pb2.DTYPE_FLOAT16,
    torch.bfloat16: common_pb2.DTYPE_BFLOAT16,
}
_FROM_PB = {value: key for key, value in _TO_PB.items()}
# Bytes are produced through an integer view of the same width: numpy has no
# bfloat16, and an integer view is a bit-exact reinterpretation for every dtype.
_INT_VIEW = {torch.float32: (torch.int32, "<i4"), torch.float16: (torch.int16, "<i2"),
             torch.bfloat16: (torch.int16, "<i2")}

PROBE_PREFIX = "mmserve-probe-"
REGION_PREFIX = "mmserve-emb-"
PROBE_NAME = re.compile(PROBE_PREFIX + "[0-9a-f]{32}")
REGION_NAME = re.compile(REGION_PREFIX + "[0-9a-f]{32}")
PROBE_TOKEN_BYTES = 16
SHM_MIN_BYTES = 64 * 1024  # smaller items stay in-band
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK  # no symlinks; a FIFO cannot block
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW

log = logging.getLogger(__name__)


def torch_dtype(name: str) -> torch.dtype:
    """"float32" | "float16" | "bfloat16" -> the torch dtype."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; "
                         f"expected one of {sorted(_BY_NAME)}") from None


def dtype_to_pb(dtype: torch.dtype) -> int:
    """torch dtype -> common_pb2.DType value."""
    try:
        return _TO_PB[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be sent; "
                         f"use float32, float16 or bfloat16") from None


def dtype_from_pb(value: int) -> torch.dtype:
    """common_pb2.DType value -> torch dtype."""
    try:
        return _FROM_PB[value]
    except KeyError:
        raise ValueError(f"unsupported wire dtype {value}") from None


def tensor_to_chunks(tensor: torch.Tensor,
                     chunk_bytes: int) -> Iterator[encoder_pb2.EmbeddingChunk]:
    """Splits [rows, hidden] into whole-row chunks of at most `chunk_bytes` payload bytes."""
    if tensor.dim() != 2:
        raise ValueError(f"expected a [rows, hidden] tensor, got shape {list(tensor.shape)}")
    dtype_to_pb(tensor.dtype)  # refuses dtypes the wire cannot carry
    rows, hidden = tensor.shape
    row_bytes = hidden * tensor.element_size()
    if row_bytes > chunk_bytes:
        raise ValueError(f"one row is {row_bytes} bytes, more than chunk_bytes={chunk_bytes}")
    rows_per_chunk = chunk_bytes // row_bytes
    array = _wire_array(tensor)
    for start in range(0, rows, rows_per_chunk):
        block = array[start:start + rows_per_chunk]
        yield encoder_pb2.EmbeddingChunk(row_offset=start, num_rows=block.shape[0],
                                         data=block.tobytes())


def _wire_array(tensor: torch.Tensor) -> np.ndarray:
    """[rows, hidden] as a C-contiguous little-endian integer array of the same bits."""
    int_dtype, wire_dtype = _INT_VIEW[tensor.dtype]
    ints = tensor.detach().cpu().contiguous().view(int_dtype)
    return np.ascontiguousarray(ints.numpy().astype(wire_dtype, copy=False))


def chunks_to_tensor(header: encoder_pb2.ItemHeader,
                     chunks: Iterable[encoder_pb2.EmbeddingChunk]) -> torch.Tensor:
    """Reassembles [num_tokens, hidden_size] from an item's chunks, checking every one."""
    dtype = dtype_from_pb(header.dtype)
    wire_dtype = _INT_VIEW[dtype][1]
    rows, hidden = header.num_tokens, header.hidden_size
    row_bytes = hidden * np.dtype(wire_dtype).itemsize
    buffer = bytearray(rows * row_bytes)
    next_row = 0
    for chunk in chunks:
        if chunk.row_offset != next_row:
            raise ValueError(f"chunk starts at row {chunk.row_offset}, expected {next_row}")
        if len(chunk.data) != chunk.num_rows * row_bytes:
            raise ValueError(f"chunk at row {chunk.row_offset} has {len(chunk.data)} bytes, "
                             f"expected {chunk.num_rows} rows x {row_bytes} bytes")
        end = next_row + chunk.num_rows
        if end > rows:
            raise ValueError(f"chunks carry more than the header's {rows} rows")
        buffer[next_row * row_bytes:end * row_bytes] = chunk.data
        next_row = end
    if next_row != rows:
        raise ValueError(f"chunks carry {next_row} rows, the header says {rows}")
    native = np.dtype(wire_dtype).newbyteorder("=")
    array = np.frombuffer(buffer, dtype=wire_dtype).astype(native, copy=False)
    return torch.from_numpy(array).view(dtype).reshape(rows, hidden)


def create_probe(directory: str) -> encoder_pb2.ShmOffer:
    """Creates `directory/mmserve-probe-<32 hex>` holding a random token; the offer naming it."""
    directory = os.path.normpath(directory)
    name, token = PROBE_PREFIX + uuid.uuid4().hex, secrets.token_bytes(PROBE_TOKEN_BYTES)
    fd = os.open(os.path.join(directory, name), _CREATE_FLAGS, 0o644)
    with open(fd, "wb") as file:
        file.write(token)
    return encoder_pb2.ShmOffer(dir=directory, probe_name=name, probe_token=token)


def remove_probe(offer: encoder_pb2.ShmOffer) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(offer.dir, offer.probe_name))


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
    if tensor.dim() != 2:
        raise ValueError(f"expected a [rows, hidden] tensor, got shape {list(tensor.shape)}")
    dtype_to_pb(tensor.dtype)
    array = _wire_array(tensor)
    path = os.path.join(directory, name)
    fd = os.open(path, _CREATE_FLAGS, 0o644)
    try:
        with open(fd, "wb") as file:
            file.write(memoryview(array).cast("B"))
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
        ints = torch.empty((header.num_tokens, header.hidden_size), dtype=_INT_VIEW[dtype][0])
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
