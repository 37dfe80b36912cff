"""Paged KV blocks: allocation, ref counts and the prefix cache. No torch here.

A block's hash chains its parent's hash with its token ids and the media content behind any
embedding slots in it, so equal hashes mean equal KV. Only full, computed blocks are hashed.
Free blocks keep their hash until reused; the free list is the eviction order: blocks without
content first, then least recently released.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from llm_service.engine.sequence import Sequence


def hash_block(parent: bytes | None, token_ids: list[int],
               span_keys: tuple[tuple[str, int, int], ...] = ()) -> bytes:
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", token_ids).tobytes())
    if span_keys:
        h.update(repr(span_keys).encode())
    return h.digest()


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int,
                 enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}  # hash -> block id, for used and free blocks
        self.num_cached_free = 0  # free blocks that still hold reusable content

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return len(self.blocks) - len(self.free_blocks)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of `seq` (changes nothing)."""
        if not self.enable_prefix_caching:
            return []
        # The last token is always recomputed: its step yields the logits to sample from.
        hits = []
        for h in self._hashes(seq, (len(seq) - 1) // self.block_size):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> bool:
        assert not seq.block_table, seq
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        need = self._num_blocks_for(len(hits) * self.block_size + num_new_tokens) - len(hits)
        return need + revived <= len(self.free_blocks)

    def allocate(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> None:
        """Gives a sequence without blocks the cached `hits` plus room for `num_new_tokens`."""
        for block_id in hits:
            self._take(block_id)
        seq.block_table = list(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
        self.append(seq, num_new_tokens)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._num_missing(seq, num_new_tokens) <= len(self.free_blocks)

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        """Adds the blocks needed to hold `num_new_tokens` after the computed ones."""
        for _ in range(self._num_missing(seq, num_new_tokens)):
            seq.block_table.append(self._pop_free())

    def free(self, seq: Sequence) -> None:
        # Tail first, so a prefix's later blocks are evicted before its first ones.
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0

    def fork(self, parent: Sequence, child: Sequence, num_blocks: int) -> None:
        """Shares the parent's first `num_blocks` (full, computed) blocks with `child`."""
        assert num_blocks * self.block_size <= parent.num_computed_tokens
        shared = parent.block_table[:num_blocks]
        for block_id in shared:
            self._take(block_id)
        child.block_table = list(shared)
        child.num_computed_tokens = num_blocks * self.block_size
        child.num_hashed_blocks = min(parent.num_hashed_blocks, num_blocks)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Offers the sequence's newly computed full blocks to the prefix cache."""
        num_full = seq.num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or num_full <= seq.num_hashed_blocks:
            return
        hashes = self._hashes(seq, num_full)
        for i in range(seq.num_hashed_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            # A twin computed concurrently keeps the entry; this copy stays private.
            if block.hash is None and hashes[i] not in self.cached:
                block.hash = hashes[i]
                self.cached[block.hash] = block.block_id
        seq.num_hashed_blocks = num_full

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        hashes, bs = seq.block_hashes, self.block_size
        for i in range(len(hashes), num_blocks):
            lo, hi = i * bs, (i + 1) * bs
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, seq.token_ids[lo:hi], seq.span_keys(lo, hi)))
        return hashes[:num_blocks]

    def _num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _num_missing(self, seq: Sequence, num_new_tokens: int) -> int:
        needed = self._num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
            self.num_cached_free -= 1
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its content
            del self.cached[block.hash]
            block.hash = None
            self.num_cached_free -= 1
        block.ref_count = 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, block
        block.ref_count -= 1
        if block.ref_count:
            return
        self.free_blocks[block_id] = None
        if block.hash is None:
            self.free_blocks.move_to_end(block_id, last=False)
        else:
            self.num_cached_free += 1
