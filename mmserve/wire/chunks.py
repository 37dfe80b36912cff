"""Embedding rows in band: tensors <-> `EmbeddingChunk`s, and torch's side of the dtype table.

An item's rows travel as `EmbeddingChunk`s after its `ItemHeader`: consecutive row ranges,
each a little-endian byte string of `num_rows * hidden_size` elements of the header's
dtype, each small enough for gRPC's default 4 MiB message limit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from mmserve.wire.dtypes import DTYPES, by_name, by_pb
from protos import common_pb2, encoder_pb2


def torch_dtype(name: str) -> torch.dtype:
    """"float32" | "float16" | "bfloat16" -> the torch dtype."""
    dtype: torch.dtype = getattr(torch, by_name(name).name)
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> its name in the dtype table; refuses dtypes the wire cannot carry."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype} cannot be sent; use float32, float16 or bfloat16")
    return name


def dtype_to_pb(dtype: torch.dtype) -> common_pb2.DType:
    """torch dtype -> common_pb2.DType value."""
    return DTYPES[dtype_name(dtype)].pb


def dtype_from_pb(value: int) -> torch.dtype:
    """common_pb2.DType value -> torch dtype."""
    return torch_dtype(by_pb(value).name)


def int_view(dtype: torch.dtype) -> tuple[torch.dtype, str]:
    """The torch and numpy integer dtypes of the same width, for bit-exact bytes."""
    wire = DTYPES[dtype_name(dtype)].int_view
    return getattr(torch, f"int{np.dtype(wire).itemsize * 8}"), wire


def wire_array(tensor: torch.Tensor) -> np.ndarray:
    """[rows, hidden] as a C-contiguous little-endian integer array of the same bits."""
    if tensor.dim() != 2:
        raise ValueError(f"expected a [rows, hidden] tensor, got shape {list(tensor.shape)}")
    int_dtype, wire = int_view(tensor.dtype)
    ints = tensor.detach().cpu().contiguous().view(int_dtype)
    return np.ascontiguousarray(ints.numpy().astype(wire, copy=False))


def tensor_to_chunks(tensor: torch.Tensor,
                     chunk_bytes: int) -> Iterator[encoder_pb2.EmbeddingChunk]:
    """Splits [rows, hidden] into whole-row chunks of at most `chunk_bytes` payload bytes."""
    array = wire_array(tensor)
    rows, hidden = tensor.shape
    row_bytes = hidden * tensor.element_size()
    if row_bytes > chunk_bytes:
        raise ValueError(f"one row is {row_bytes} bytes, more than chunk_bytes={chunk_bytes}")
    rows_per_chunk = chunk_bytes // row_bytes
    for start in range(0, rows, rows_per_chunk):
        block = array[start:start + rows_per_chunk]
        yield encoder_pb2.EmbeddingChunk(row_offset=start, num_rows=block.shape[0],
                                         data=block.tobytes())


def chunks_to_tensor(header: encoder_pb2.ItemHeader,
                     chunks: Iterable[encoder_pb2.EmbeddingChunk]) -> torch.Tensor:
    """Reassembles [num_tokens, hidden_size] from an item's chunks, checking every one."""
    dtype = dtype_from_pb(header.dtype)
    wire = int_view(dtype)[1]
    rows, hidden = header.num_tokens, header.hidden_size
    row_bytes = hidden * np.dtype(wire).itemsize
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
    native = np.dtype(wire).newbyteorder("=")
    array = np.frombuffer(buffer, dtype=wire).astype(native, copy=False)
    return torch.from_numpy(array).view(dtype).reshape(rows, hidden)
