"""Embedding rows on the wire: exact round trips, chunk sizes, strict reassembly."""

from __future__ import annotations

import struct

import pytest
import torch

from mmserve.wire.chunks import (
    chunks_to_tensor,
    dtype_from_pb,
    dtype_to_pb,
    tensor_to_chunks,
    torch_dtype,
)
from protos import common_pb2, encoder_pb2

MIB = 1024 * 1024


def header_for(tensor: torch.Tensor) -> encoder_pb2.ItemHeader:
    return encoder_pb2.ItemHeader(num_tokens=tensor.shape[0], hidden_size=tensor.shape[1],
                                  dtype=dtype_to_pb(tensor.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_exact(dtype):
    tensor = torch.randn(1792, 576).to(dtype)
    chunks = list(tensor_to_chunks(tensor, 3 * MIB))
    restored = chunks_to_tensor(header_for(tensor), chunks)
    assert restored.dtype == dtype and restored.shape == (1792, 576)
    assert torch.equal(restored.view(torch.uint8), tensor.contiguous().view(torch.uint8))


def test_large_tensor_chunks_stay_below_the_grpc_limit():
    tensor = torch.randn(3328, 2048)  # 13 tiles at a 2048-wide LLM: 27 MiB
    chunks = list(tensor_to_chunks(tensor, 3 * MIB))
    assert len(chunks) == 9  # 384 rows of 8 KiB per 3 MiB chunk
    assert all(encoder_pb2.EncodeResponse(item_index=0, chunk=c).ByteSize() < 4 * MIB
               for c in chunks)
    offsets = [c.row_offset for c in chunks]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert sum(c.num_rows for c in chunks) == 3328
    assert torch.equal(chunks_to_tensor(header_for(tensor), chunks), tensor)


def test_bytes_are_little_endian_rows():
    tensor = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    (chunk,) = tensor_to_chunks(tensor, 1024)
    assert chunk.data == struct.pack("<4f", 1.0, -2.0, 0.5, 3.0)
    bf16 = torch.tensor([[1.0]], dtype=torch.bfloat16)
    assert next(tensor_to_chunks(bf16, 1024)).data == struct.pack("<H", 0x3F80)


def test_dtype_mapping():
    assert dtype_from_pb(common_pb2.DTYPE_BFLOAT16) == torch.bfloat16
    assert dtype_to_pb(torch.float16) == common_pb2.DTYPE_FLOAT16
    assert torch_dtype("float32") == torch.float32
    with pytest.raises(ValueError, match="unsupported wire dtype 0"):
        dtype_from_pb(common_pb2.DTYPE_UNSPECIFIED)
    with pytest.raises(ValueError, match="cannot be sent"):
        list(tensor_to_chunks(torch.zeros(2, 2, dtype=torch.float64), 1024))


def test_reassembly_refuses_missing_or_malformed_chunks():
    tensor = torch.randn(10, 64)
    chunks = list(tensor_to_chunks(tensor, 64 * 4 * 3))  # 3 rows per chunk
    assert [c.num_rows for c in chunks] == [3, 3, 3, 1]
    header = header_for(tensor)
    with pytest.raises(ValueError, match="starts at row 6, expected 3"):
        chunks_to_tensor(header, [chunks[0], chunks[2], chunks[3]])
    with pytest.raises(ValueError, match="carry 9 rows, the header says 10"):
        chunks_to_tensor(header, chunks[:3])
    short = encoder_pb2.EmbeddingChunk(row_offset=0, num_rows=3, data=chunks[0].data[:-4])
    with pytest.raises(ValueError, match="has 764 bytes"):
        chunks_to_tensor(header, [short])
    small = encoder_pb2.ItemHeader(num_tokens=2, hidden_size=64, dtype=header.dtype)
    with pytest.raises(ValueError, match="more than the header's 2 rows"):
        chunks_to_tensor(small, chunks[:1])


def test_a_row_larger_than_a_chunk_is_refused():
    with pytest.raises(ValueError, match="one row is 4096 bytes"):
        list(tensor_to_chunks(torch.zeros(1, 1024), 2048))
