"""Paged attention: K/V live in fixed-size blocks and are read through block tables.

Rows of a step's flat batch are laid out "paged" rows first, each attending on its own
through its sequence's block table, then one contiguous run per remaining multi-token
sequence (a prompt or a prompt chunk, attended by its own SDPA call). In plain torch the
paged rows are the decodes (one token each), attended by one padded SDPA call over their
gathered blocks; this path runs on CPU and CUDA and is the reference the kernel is tested
against. With the CPU kernel `mmserve::paged_decode`, which reads K/V in place, prompt rows
are paged rows too (see model_runner.paged_prefill): a prompt row is a decode whose context
ends at its own position, and its K/V are in the cache before attention runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class KVCache:
    """The preallocated pool: [num_layers, 2 (K, V), num_blocks, kv_heads, block_size, head_dim].

    Head-major within a block (as vLLM's CPU and TensorRT-LLM's caches are): one KV head's
    keys of a block are one contiguous run, which decode attention streams. With the heads
    interleaved per slot (SmolLM2, 64 sequences, 16-token blocks) it ran 1.16x (fp32) and
    1.28x (bf16) slower.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.block_size = block_size
        self.pool = torch.zeros(num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim,
                                dtype=dtype, device=device)
        self._layers = [LayerCache(self.pool[i, 0], self.pool[i, 1]) for i in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return num_layers * 2 * block_size * num_kv_heads * head_dim * itemsize

    @property
    def num_blocks(self) -> int:
        return self.pool.shape[2]

    def layer(self, index: int) -> LayerCache:
        return self._layers[index]


class LayerCache:
    """One layer's K and V, each [num_blocks, kv_heads, block_size, head_dim]. Slot s is
    row s % block_size of block s // block_size."""

    __slots__ = ("k", "v")

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    def write(self, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor,
              rows: torch.Tensor) -> None:
        """k, v: [T, kv_heads, head_dim] into row rows[i] of block blocks[i]."""
        self.k[blocks, :, rows] = k
        self.v[blocks, :, rows] = v

    def read(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the given slots, each [len(slots), kv_heads, head_dim]."""
        blocks, rows = slots // self.block_size, slots % self.block_size
        return self.k[blocks, :, rows], self.v[blocks, :, rows]


@dataclass(slots=True)
class PrefillRun:
    """One sequence computing `end - start` tokens in this step."""

    start: int  # first row in the flat batch
    end: int
    context_len: int  # keys it attends to after this step
    block_ids: torch.Tensor | None  # its blocks, when earlier tokens are already cached
    mask: torch.Tensor | None  # [rows, context_len] additive; None: causal over the new rows


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T]: pool slot (block * block_size + offset) of each new token
    # Rows [0, paged_rows) each attend alone through their sequence's block table: the
    # decodes, and with the kernel the rows of prompt chunks it takes
    paged_rows: int
    # [paged_rows, max_blocks], padded with any block id: int32 for the kernel, else int64
    decode_blocks: torch.Tensor | None
    decode_len: int  # keys attended by the longest paged row
    # Plain torch: [paged_rows, 1, 1, decode_len] additive; None when all decodes have
    # decode_len keys. The kernel takes decode_lens instead.
    decode_mask: torch.Tensor | None
    prefills: list[PrefillRun]  # the multi-token runs attended by SDPA
    decode_lens: torch.Tensor | None = None  # int32 [paged_rows]: keys of each paged row
    kernel: bool = False  # paged rows run mmserve::paged_decode
    _slot_index: tuple[torch.Tensor, torch.Tensor] | None = None

    def slot_index(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """slot_mapping as (block, row within the block): worked out once per step, for
        every layer's plain-torch cache write."""
        if self._slot_index is None:
            self._slot_index = (self.slot_mapping // block_size, self.slot_mapping % block_size)
        return self._slot_index


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                    meta: AttentionMetadata) -> torch.Tensor:
    """q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim], already written into `cache`.
    Returns the attention output, [T, heads * head_dim]."""
    num_tokens, num_heads, head_dim = q.shape
    if meta.paged_rows == num_tokens:
        return _decode(q, cache, meta).view(num_tokens, -1)
    out = q.new_empty(num_tokens, num_heads, head_dim)
    if meta.paged_rows:
        out[: meta.paged_rows] = _decode(q[: meta.paged_rows], cache, meta)
    for run in meta.prefills:
        # 4-D [1, heads, rows, head_dim]: the CPU flash kernel takes nothing else
        qr = q[run.start: run.end].transpose(0, 1).unsqueeze(0)
        if run.block_ids is None:
            kr = k[run.start: run.end].transpose(0, 1)
            vr = v[run.start: run.end].transpose(0, 1)
        else:
            kr = _gather(cache.k, run.block_ids)[:, : run.context_len]
            vr = _gather(cache.v, run.block_ids)[:, : run.context_len]
        o = F.scaled_dot_product_attention(
            qr, kr.unsqueeze(0), vr.unsqueeze(0),
            attn_mask=run.mask, is_causal=run.mask is None, enable_gqa=True)
        out[run.start: run.end] = o[0].transpose(0, 1)
    return out.view(num_tokens, -1)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """[kv_heads, blocks * block_size, head_dim]: the slots of the given blocks, in order.
    (index_select on the leading dim copies whole blocks; on any other dim it is far slower.)"""
    return cache.index_select(0, block_ids).transpose(0, 1).flatten(1, 2)


def _decode(q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata) -> torch.Tensor:
    n, num_heads, head_dim = q.shape
    if meta.kernel:
        return torch.ops.mmserve.paged_decode(q, cache.k, cache.v, meta.decode_blocks,
                                              meta.decode_lens, head_dim ** -0.5)
    assert meta.decode_blocks is not None, "decodes come with their block tables"
    num_kv_heads = cache.k.shape[1]
    blocks = meta.decode_blocks.flatten()

    def per_sequence(pool: torch.Tensor) -> torch.Tensor:
        """[n, kv_heads, decode_len, head_dim]: each decode's keys or values."""
        rows = pool.index_select(0, blocks).unflatten(0, (n, -1))  # [n, width, kvh, bs, d]
        return rows.transpose(1, 2).flatten(2, 3)[:, :, : meta.decode_len]

    keys, values = per_sequence(cache.k), per_sequence(cache.v)
    if q.is_cuda:
        # Query heads sharing a KV head attend together as that head's "query rows": no
        # repeated K/V, and every CUDA SDPA backend takes it, with a padding mask too.
        qg = q.unflatten(1, (num_kv_heads, num_heads // num_kv_heads))
        o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=meta.decode_mask)
    else:
        # One query row per head, mapped onto its KV head by SDPA (enable_gqa): the CPU
        # kernel runs this faster than the grouped rows.
        o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values,
                                           attn_mask=meta.decode_mask, enable_gqa=True)
    return o.reshape(n, num_heads, head_dim)
