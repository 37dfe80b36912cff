"""The C++ CPU kernels against the plain-torch path they replace (the reference).

Random block tables with ragged context lengths, grouped-query attention and several block
sizes, in fp32 and bf16; then a whole model with the kernels against the same model in plain
torch, so a bypassed or wrong kernel fails here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_service.engine import cpu_kernels
from llm_service.engine.models.attention import AttentionMetadata, LayerCache, _decode
from llm_service.engine.models.llama import RMSNorm
from llm_service.engine.models.rope import RopeSpec, RotaryEmbedding, apply_rotary
from llm_service.engine.outputs import ScheduledSequence

from tiny_checkpoints import VOCAB, save_checkpoint

pytestmark = pytest.mark.skipif(not cpu_kernels.load(),
                                reason=f"CPU kernels cannot be built: {cpu_kernels.error()}")

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(atol=2e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def _tables(lengths: list[int], block_size: int, num_blocks: int, g: torch.Generator):
    width = -(-max(lengths) // block_size)
    # every sequence gets distinct random blocks; the padding points at real blocks too
    return torch.stack([torch.randperm(num_blocks, generator=g)[:width]
                        for _ in lengths]).to(torch.int32)


def _reference_decode(q, cache: LayerCache, tables, lengths):
    longest = max(lengths)
    valid = torch.arange(longest).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    mask = torch.zeros(len(lengths), longest, dtype=q.dtype).masked_fill_(~valid, float("-inf"))
    meta = AttentionMetadata(torch.empty(0), len(lengths), tables.long(), longest,
                             mask.view(len(lengths), 1, 1, -1), [])
    return _decode(q, cache, meta)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 4, 16, 32, 128])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 16), (8, 1, 128), (14, 2, 64)])
def test_paged_decode_matches_plain_torch(dtype, block_size, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(block_size * 131 + heads)
    num_blocks = 200 // block_size + 40
    pool = torch.randn(2, num_blocks, kv_heads, block_size, head_dim, generator=g).to(dtype)
    cache = LayerCache(pool[0], pool[1])
    lengths = [1, 2, block_size, block_size + 1, 77, 150, 3]
    tables = _tables(lengths, block_size, num_blocks, g)
    q = torch.randn(len(lengths), heads, head_dim, generator=g).to(dtype)
    got = torch.ops.mmserve.paged_decode(q, cache.k, cache.v, tables,
                                         torch.tensor(lengths, dtype=torch.int32),
                                         head_dim ** -0.5)
    expected = _reference_decode(q, cache, tables, lengths)
    torch.testing.assert_close(got.float(), expected.float(), **TOL[dtype])


def test_paged_decode_reads_a_strided_query_and_only_its_own_blocks():
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(2, 30, 2, 4, 16, generator=g)
    cache = LayerCache(pool[0], pool[1])
    rows = torch.randn(3, 4 + 2 * 2, 16, generator=g)  # fused qkv rows: q is a strided view
    q = rows[:, :4]
    lengths, tables = [5, 9, 1], _tables([5, 9, 1], 4, 30, g)
    expected = _reference_decode(q.contiguous(), cache, tables, lengths)
    # poisoning every block no sequence reads changes nothing
    used = {int(b) for s, n in enumerate(lengths) for b in tables[s, : -(-n // 4)]}
    for b in set(range(30)) - used:
        pool[:, b] = float("nan")
    got = torch.ops.mmserve.paged_decode(q, cache.k, cache.v, tables,
                                         torch.tensor(lengths, dtype=torch.int32), 0.25)
    torch.testing.assert_close(got, expected, **TOL[torch.float32])


@pytest.mark.parametrize("lengths,table,message", [
    ([9], [[0, 1]], "outside \\[1, 8\\]"),
    ([0], [[0, 1]], "outside \\[1, 8\\]"),
    ([5], [[0, 99]], "is not a block of the cache"),
    ([5], [[-1, 0]], "is not a block of the cache"),
])
def test_paged_decode_refuses_tables_it_would_read_outside(lengths, table, message):
    pool = torch.zeros(2, 4, 1, 4, 8)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.mmserve.paged_decode(torch.zeros(1, 1, 8), pool[0], pool[1],
                                       torch.tensor(table, dtype=torch.int32),
                                       torch.tensor(lengths, dtype=torch.int32), 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_match_plain_torch(dtype):
    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(96, 1e-6)
    norm.weight.data = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype)
    x = torch.randn(37, 96, generator=g).to(dtype)
    residual = torch.randn(37, 96, generator=g).to(dtype)
    torch.testing.assert_close(norm(x, None, True), norm(x, None, False), **TOL[dtype])
    r_kernel, r_torch = residual.clone(), residual.clone()
    got, expected = norm(x, r_kernel, True), norm(x, r_torch, False)
    assert torch.equal(r_kernel, r_torch)  # the residual add rounds exactly like torch's
    torch.testing.assert_close(got, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary_dim", [16, 8])  # whole head; partial (Phi-3 style)
def test_rope_and_cache_matches_plain_torch(dtype, rotary_dim):
    g = torch.Generator().manual_seed(2)
    heads, kv_heads, head_dim, rows = 4, 2, 16, 11
    rope = RotaryEmbedding(RopeSpec(theta=10000.0, rotary_dim=rotary_dim), 64,
                           torch.device("cpu"), dtype)
    positions = torch.randint(0, 64, (rows,), generator=g)
    slots = torch.randperm(40, generator=g)[:rows]
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    pool = torch.zeros(2, 10, kv_heads, 4, head_dim, dtype=dtype)
    cache = LayerCache(pool[0], pool[1])

    cos, sin = rope.lookup(positions)
    ref_rows = qkv.view(rows, -1, head_dim)
    ref_qk = apply_rotary(ref_rows[:, : heads + kv_heads], cos, sin)
    got = qkv.clone()
    torch.ops.mmserve.rope_and_cache(got, rope.cos, rope.sin, positions, cache.k, cache.v,
                                     slots, heads, kv_heads)
    got_rows = got.view(rows, -1, head_dim)
    torch.testing.assert_close(got_rows[:, : heads + kv_heads], ref_qk, **TOL[dtype])
    assert torch.equal(got_rows[:, heads + kv_heads:], ref_rows[:, heads + kv_heads:])
    k, v = cache.read(slots)
    assert torch.equal(k, got_rows[:, heads: heads + kv_heads])
    assert torch.equal(v, ref_rows[:, heads + kv_heads:])
    # slot 4b + r of head h is row r of block b's run for h
    b, r = int(slots[0]) // 4, int(slots[0]) % 4
    assert torch.equal(cache.k[b, 1, r], got_rows[0, heads + 1])
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[slots] = False
    k, v = cache.read(torch.arange(40)[untouched])
    assert not k.any() and not v.any()
    # the plain-torch write puts the same rows in the same places
    torch_pool = torch.zeros_like(pool)
    LayerCache(torch_pool[0], torch_pool[1]).write(got_rows[:, heads: heads + kv_heads],
                                                   ref_rows[:, heads + kv_heads:], slots // 4,
                                                   slots % 4)
    assert torch.equal(torch_pool, pool)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_plain_torch(dtype):
    g = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(13, 2 * 150, generator=g) * 6).to(dtype)  # large |x| too
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(torch.ops.mmserve.silu_and_mul(gate_up), F.silu(gate) * up,
                               **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 255, 256, 257, 49152 + 17])
def test_argmax_rows_matches_torch(dtype, vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(9, vocab, generator=g).to(dtype)
    logits[1] = float("-inf")  # nothing allowed: torch says 0
    logits[2, :] = 1.0  # all tied: the first
    if vocab > 300:
        logits[3, [5, 260, vocab - 1]] = 50.0  # ties across chunks: the first
        logits[4, [7, vocab - 3]] = float("nan")  # a NaN is the maximum, the first of them
        logits[5, vocab - 1] = float("inf")  # in the last, ragged chunk
        logits[6, [0, 300]] = float("inf")
    strided = torch.randn(4, vocab + 5, generator=g).to(dtype)[:, 2: vocab + 2]
    for x in (logits, strided):
        assert torch.equal(torch.ops.mmserve.argmax_rows(x), x.float().argmax(dim=-1))


# Row blocks of 6 (AVX2) and 12 (AVX-512) with every tail; 176 outputs are 11 panels, two
# tasks, the second ending in a lone panel; 2048 inputs make row chunks of 24 (100 rows: five).
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 12, 13, 25, 100])
@pytest.mark.parametrize("out_features, in_features", [(48, 72), (176, 2048)])
@pytest.mark.parametrize("bias", [False, True])
def test_panel_linear_matches_torch(rows, out_features, in_features, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    x = torch.randn(rows, in_features + 8, generator=g)[:, 3: 3 + in_features]  # strided rows
    got = torch.ops.mmserve.panel_linear(x, torch.ops.mmserve.pack_panels(w), b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=2e-4)


@pytest.mark.skipif(not cpu_kernels.has_bf16_dot(), reason="this CPU has no AVX-512 BF16")
@pytest.mark.parametrize("rows", [1, 7, 12, 25, 100])
@pytest.mark.parametrize("out_features, in_features", [(48, 72), (176, 2048)])
@pytest.mark.parametrize("bias", [False, True])
def test_panel_linear_in_bf16_rounds_once(rows, out_features, in_features, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(out_features, in_features, generator=g).bfloat16()
    b = torch.randn(out_features, generator=g).bfloat16() if bias else None
    x = torch.randn(rows, in_features + 8, generator=g).bfloat16()[:, 2: 2 + in_features]
    got = torch.ops.mmserve.panel_linear(x, torch.ops.mmserve.pack_panels(w), b)
    assert got.dtype == torch.bfloat16
    # the fp32 sum of the bf16 products, rounded once to bf16: at most half a bf16 step off
    exact = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert ((got.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-3).all()


def test_pack_panels_refuses_out_features_off_the_panel_width():
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.mmserve.pack_panels(torch.randn(40, 8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_keeps_the_edges(dtype):
    """The kernel's exp and bf16 rounding are branch-free (so they vectorize): the edges must
    still come out as torch's, past exp's range, at infinities and for NaN."""
    edges = [0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 88.0, -88.0, -100.0, 1e30, -1e30,
             float("inf"), float("-inf"), float("nan"), 3.3895e38, -3.3895e38]
    gate = torch.tensor(edges + [0.5] * 16, dtype=dtype)  # past 16 lanes: the vector loop too
    up = torch.full_like(gate, 1.5)
    got = torch.ops.mmserve.silu_and_mul(torch.cat([gate, up]).unsqueeze(0))[0]
    torch.testing.assert_close(got, F.silu(gate) * up, equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 8])
@pytest.mark.parametrize("in_features", [64, 50])  # the vector path; the plain loop
def test_skinny_linear_matches_torch(dtype, rows, in_features):
    g = torch.Generator().manual_seed(rows * 7 + in_features)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    weight = torch.randn(301, in_features, generator=g).to(dtype)
    bias = torch.randn(301, generator=g).to(dtype)
    for b in (None, bias):
        got = torch.ops.mmserve.skinny_linear(x, weight, b)
        expected = F.linear(x.float(), weight.float(), None if b is None else b.float())
        # bf16: the kernel rounds once at the end, like a bf16 matmul
        torch.testing.assert_close(got.float(), expected, **(
            TOL[dtype] if dtype == torch.float32 else dict(atol=0.1, rtol=1e-2)))
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        torch.ops.mmserve.skinny_linear(torch.zeros(9, in_features, dtype=dtype), weight, None)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("linear", ["onednn", "panels"])
def test_a_model_on_the_kernels_gives_the_plain_torch_logits(tmp_path, family, linear):
    from test_models import engine_logits, make_runner

    save_checkpoint(tmp_path, family, seed=7)
    runner = make_runner(tmp_path, cpu_linear=linear)
    assert runner.kernels and runner.model.fused and runner.model.layers[0].fused
    # oneDNN's packed weights keep a dense copy for the skinny kernel; panels need none
    skinny = 4 if linear == "onednn" else 0
    assert runner.model.layers[0].qkv.skinny_rows == skinny == runner.model.skinny_rows
    assert (runner.model.layers[0].qkv.packed.dim() == 3) == (linear == "panels")
    tokens = torch.randint(0, VOCAB, (33,), generator=torch.Generator().manual_seed(4)).tolist()
    chunks = [20, 1, 1, 11]  # a prefill, decodes over the paged cache, a chunk over it
    with_kernels = engine_logits(runner, tokens, chunks)
    runner.model.use_cpu_kernels(False)
    runner.kernels = False
    assert runner.model.layers[0].qkv.skinny_rows == 0
    plain = engine_logits(runner, tokens, chunks)
    torch.testing.assert_close(with_kernels, plain, atol=1e-4, rtol=0)


def test_prompt_rows_take_the_paged_kernel_and_long_fp32_chunks_sdpa(tmp_path, monkeypatch):
    from test_models import engine_logits, make_runner

    from llm_service.engine import model_runner

    save_checkpoint(tmp_path, "llama", seed=9)
    runner = make_runner(tmp_path)
    metas = []
    prepare = runner.prepare

    def recorded(scheduled):
        inputs = prepare(scheduled)
        metas.append(inputs.meta)
        return inputs

    monkeypatch.setattr(runner, "prepare", recorded)
    monkeypatch.setattr(model_runner, "PAGED_PREFILL_FP32", 24)
    tokens = torch.randint(0, VOCAB, (33,), generator=torch.Generator().manual_seed(5)).tolist()
    chunks = [20, 1, 11]  # a prompt chunk within the fp32 limit, a decode, one past it
    got = engine_logits(runner, tokens, chunks)
    assert [(m.paged_rows, len(m.prefills)) for m in metas] == [(20, 0), (1, 0), (0, 1)]
    assert metas[0].decode_lens.tolist() == list(range(1, 21))  # each row sees its past
    assert metas[0].decode_blocks.shape == (20, 5)  # the prompt's table on every row
    # bf16 chunks take the kernel at any length (it stays ahead of SDPA there)
    long_chunk = ScheduledSequence(None, 0, 4000, False)
    assert not runner.paged_prefill(long_chunk)
    monkeypatch.setattr(runner, "dtype", torch.bfloat16)
    assert runner.paged_prefill(long_chunk)
    monkeypatch.setattr(runner, "dtype", torch.float32)
    runner.model.use_cpu_kernels(False)
    runner.kernels = False
    plain = engine_logits(runner, tokens, chunks)
    assert metas[-1].paged_rows == 0 and len(metas[-1].prefills) == 1  # SDPA, no kernel
    torch.testing.assert_close(got, plain, atol=1e-4, rtol=0)


@pytest.mark.parametrize("flags, panels", [
    ("fpu sse2 avx fma avx2", True),
    ("fpu sse2 avx fma avx2 avx512f avx512bw", True),
    ("fpu sse2 avx", False),  # the portable loop is slower than oneDNN there
    ("fp asimd", False),
])
def test_auto_picks_panels_where_the_register_blocks_are(monkeypatch, flags, panels):
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: flags)
    assert cpu_kernels.has_fma_vectors() is panels
