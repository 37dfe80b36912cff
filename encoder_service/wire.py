"""Embedding rows on the wire, shared by the encoder (sender) and the LLM service (receiver).

An item's rows travel as `EmbeddingChunk`s after its `ItemHeader`: consecutive row
ranges, each a little-endian byte string of `num_rows * hidden_size` elements of
the header's dtype, each small enough for gRPC's default 4 MiB message limit.
"""

from __future__ import annotations

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
    int_dtype, wire_dtype = _INT_VIEW[tensor.dtype]
    rows_per_chunk = chunk_bytes // row_bytes
    ints = tensor.detach().cpu().contiguous().view(int_dtype)
    for start in range(0, rows, rows_per_chunk):
        block = ints[start:start + rows_per_chunk].numpy().astype(wire_dtype, copy=False)
        yield encoder_pb2.EmbeddingChunk(row_offset=start, num_rows=block.shape[0],
                                         data=block.tobytes())


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
