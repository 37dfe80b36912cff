from __future__ import annotations

import numpy as np

from llm_service.engine.block_manager import BlockManager
from llm_service.engine.protocol import EmbeddingSpan, EngineRequest
from llm_service.engine.sequence import Sequence

BS = 4


def make_seq(tokens: list[int], spans: tuple[EmbeddingSpan, ...] = (), seq_id: int = 0) -> Sequence:
    request = EngineRequest(request_id=f"r{seq_id}", prompt_token_ids=tokens, spans=spans)
    return Sequence(seq_id, request, arrival=seq_id, max_model_len=1024)


def span(start: int, length: int, content_hash: str) -> EmbeddingSpan:
    return EmbeddingSpan(start=start, embeddings=np.zeros((length, 8)), content_hash=content_hash)


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """Allocates the whole sequence as one step and marks it computed, as the scheduler does."""
    hits = bm.match_prefix(seq)
    bm.allocate(seq, hits, len(seq) - len(hits) * BS)
    seq.num_computed_tokens = len(seq)
    bm.cache_full_blocks(seq)


def refs(bm: BlockManager) -> list[int]:
    return [b.ref_count for b in bm.blocks]


def test_allocate_takes_lowest_free_blocks_and_free_returns_them():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = make_seq(list(range(10)))
    assert bm.can_allocate(a, [], 10)
    bm.allocate(a, [], 10)
    assert a.block_table == [0, 1, 2]
    assert refs(bm) == [1, 1, 1, 0, 0, 0]
    assert bm.num_free_blocks == 3
    assert not bm.can_allocate(make_seq(list(range(13)), seq_id=1), [], 13)
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 6 and refs(bm) == [0] * 6


def test_append_adds_a_block_only_when_the_last_one_is_full():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(list(range(7)))
    bm.allocate(a, [], 7)
    a.num_computed_tokens = 7
    a.token_ids.append(99)
    bm.append(a, 1)  # position 7 fits block 1
    assert a.block_table == [0, 1]
    a.num_computed_tokens = 8
    a.token_ids.append(100)
    assert bm.can_append(a, 1)
    bm.append(a, 1)  # position 8 starts block 2
    assert a.block_table == [0, 1, 2]


def test_prefix_hit_shares_full_blocks_and_counts_refs():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(list(range(14)))  # blocks 0..2 full, block 3 partial
    compute_all(bm, a)
    assert a.block_table == [0, 1, 2, 3]
    b = make_seq(list(range(12)) + [77, 78, 79], seq_id=1)  # shares 3 full blocks
    hits = bm.match_prefix(b)
    assert hits == [0, 1, 2]
    bm.allocate(b, hits, 3)
    assert b.block_table == [0, 1, 2, 4]
    assert b.num_computed_tokens == 12
    assert refs(bm)[:5] == [2, 2, 2, 1, 1]
    bm.free(a)
    assert refs(bm)[:5] == [1, 1, 1, 0, 1]
    bm.free(b)
    assert bm.num_free_blocks == 8
    assert bm.num_cached_free == 3  # the three full blocks keep their content


def test_match_leaves_the_last_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=BS)
    compute_all(bm, make_seq(list(range(12))))
    same = make_seq(list(range(12)), seq_id=1)
    assert bm.match_prefix(same) == [0, 1]  # block 2 holds the last token: recomputed


def test_divergent_block_stops_the_match():
    bm = BlockManager(num_blocks=8, block_size=BS)
    compute_all(bm, make_seq(list(range(12)) + [5]))
    other = make_seq([0, 1, 2, 3, 9, 9, 9, 9, 8, 9, 10, 11, 12], seq_id=1)
    assert bm.match_prefix(other) == [0]  # block 1 differs, so block 2 cannot match either


def test_eviction_reuses_empty_blocks_first_then_least_recently_released():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = make_seq(list(range(9)))  # blocks 0, 1 full, 2 partial
    compute_all(bm, a)
    b = make_seq(list(range(100, 109)), seq_id=1)  # blocks 3, 4 full, 5 partial
    compute_all(bm, b)
    bm.free(a)
    bm.free(b)
    # partial blocks first (latest freed in front), then full blocks tail-first, a before b
    assert list(bm.free_blocks) == [5, 2, 1, 0, 4, 3]
    assert bm.num_cached_free == 4
    c = make_seq(list(range(200, 215)), seq_id=2)  # needs 4 blocks: evicts 1 and 0
    bm.allocate(c, [], 15)
    assert c.block_table == [5, 2, 1, 0]
    assert bm.num_cached_free == 2
    assert bm.match_prefix(make_seq(list(range(9)), seq_id=3)) == []  # a's content is gone
    assert bm.match_prefix(make_seq(list(range(100, 109)), seq_id=4)) == [3, 4]


def test_a_hit_on_a_free_block_revives_it():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(list(range(9)))
    compute_all(bm, a)
    bm.free(a)
    b = make_seq(list(range(9)), seq_id=1)
    hits = bm.match_prefix(b)
    assert hits == [0, 1]
    # two revived blocks plus one new one: 3 of the 4 free blocks
    assert bm.can_allocate(b, hits, 1)
    bm.allocate(b, hits, 1)
    assert b.block_table == [0, 1, 2]
    assert refs(bm) == [1, 1, 1, 0]
    assert not bm.can_allocate(make_seq(list(range(50, 55)), seq_id=2), [], 5)


def test_span_content_hash_decides_sharing_not_placeholder_ids():
    bm = BlockManager(num_blocks=16, block_size=BS)
    placeholder = [0, 1] + [7] * 8 + [2, 3, 4]
    compute_all(bm, make_seq(placeholder, (span(2, 8, "img-A"),)))
    other_image = make_seq(placeholder, (span(2, 8, "img-B"),), seq_id=1)
    assert bm.match_prefix(other_image) == []  # block 0 already holds image rows
    same_image = make_seq(placeholder + [5, 6], (span(2, 8, "img-A"),), seq_id=2)
    assert bm.match_prefix(same_image) == [0, 1, 2]
    shifted = make_seq([9] + placeholder[1:], (span(2, 8, "img-A"),), seq_id=3)
    assert bm.match_prefix(shifted) == []


def test_same_image_in_a_later_turn_reuses_the_first_turns_blocks():
    bm = BlockManager(num_blocks=16, block_size=BS)
    turn1 = [1, 2] + [7] * 6 + [3, 4, 5, 6]
    compute_all(bm, make_seq(turn1, (span(2, 6, "img-A"),)))
    turn2 = turn1 + [40, 41, 42, 43, 44] + [7] * 6 + [8]  # answer, then a second image
    seq = make_seq(turn2, (span(2, 6, "img-A"), span(17, 6, "img-C")), seq_id=1)
    assert bm.match_prefix(seq) == [0, 1, 2]


def test_prefix_caching_off_never_shares():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    compute_all(bm, make_seq(list(range(9))))
    assert bm.cached == {}
    assert bm.match_prefix(make_seq(list(range(9)), seq_id=1)) == []


def test_twins_computed_together_keep_one_cache_entry():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a, b = make_seq(list(range(9))), make_seq(list(range(9)), seq_id=1)
    bm.allocate(a, [], 9)
    bm.allocate(b, [], 9)
    for seq in (a, b):
        seq.num_computed_tokens = 9
        bm.cache_full_blocks(seq)
    assert a.block_table == [0, 1, 2] and b.block_table == [3, 4, 5]
    assert sorted(bm.cached.values()) == [0, 1]
    assert bm.blocks[3].hash is None and bm.blocks[4].hash is None


def test_fork_shares_leading_blocks():
    bm = BlockManager(num_blocks=8, block_size=BS)
    parent = make_seq(list(range(10)))
    compute_all(bm, parent)
    child = parent.fork(seq_id=1, index=1)
    bm.fork(parent, child, 2)
    assert child.block_table == [0, 1]
    assert child.num_computed_tokens == 8
    assert refs(bm)[:3] == [2, 2, 1]
    bm.append(child, 2)
    assert child.block_table == [0, 1, 3]
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8
