"""Every family's checkpoint, loaded by the engine, gives transformers' logits (fp32, atol 1e-4),
whether a prompt is computed at once, in chunks over the paged cache, or token by token."""

from __future__ import annotations

import json

import pytest
import torch

from llm_service.engine import cpu_kernels
from llm_service.engine.block_manager import BlockManager
from llm_service.engine.config import EngineConfig
from llm_service.engine.model_runner import ModelRunner
from llm_service.engine.cpu_tuning import can_prepack
from llm_service.engine.models.loader import load_model, read_spec
from llm_service.engine.outputs import ScheduledSequence
from llm_service.engine.protocol import EngineRequest
from llm_service.engine.sequence import Sequence

from tiny_checkpoints import VOCAB, save_checkpoint

ATOL = 1e-4
# Hub checkpoints' form (`rope_theta` + `rope_scaling`), which transformers 4.57 and 5.x both
# take; 5.x saves it back as `rope_parameters`, so the engine reads both forms across the two.
LONGROPE = {"original_max_position_embeddings": 64, "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5, "rope_scaling": {
                "type": "longrope", "short_factor": [1.0, 1.3, 1.7, 2.2],
                "long_factor": [1.5, 2.0, 3.0, 4.0]}}
LLAMA3 = {"rope_theta": 50000.0, "rope_scaling": {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}

CASES = {
    "llama": ("llama", False, {}),
    "llama-rope-llama3": ("llama", False, LLAMA3),
    "qwen2": ("qwen2", False, {}),
    "qwen2-internvl-wrapped": ("qwen2", True, {}),
    "phi3-longrope-partial": ("phi3", False, LONGROPE),
    "internlm2": ("internlm2", False, {}),
    "internlm2-internvl-wrapped": ("internlm2", True, {}),
    "qwen-v1-qwen-vl": ("qwen", False, {}),
    "llama-megrez-wrapped": ("llama", "megrez", {}),
}


def make_runner(model_dir, **overrides) -> ModelRunner:
    return ModelRunner(EngineConfig(model_dir=model_dir, device="cpu", block_size=4,
                                    kv_cache_bytes=1 << 22, **overrides))


@torch.inference_mode()
def engine_logits(runner: ModelRunner, tokens: list[int], chunks: list[int]) -> torch.Tensor:
    """Logits at every position, computing the prompt in the given chunk sizes."""
    bm = BlockManager(runner.num_blocks, runner.block_size)
    seq = Sequence(0, EngineRequest("t", tokens), 0, runner.max_model_len)
    logits = []
    for n in chunks:
        bm.append(seq, n)
        inputs = runner.prepare([ScheduledSequence(seq, seq.num_computed_tokens, n, False)])
        hidden = runner.model(inputs.embeds, inputs.positions, runner.kv_cache, inputs.meta)
        logits.append(runner.model.compute_logits(hidden))
        seq.num_computed_tokens += n
    return torch.cat(logits)


@torch.inference_mode()
def reference_logits(reference, tokens: list[int]) -> torch.Tensor:
    return reference(torch.tensor([tokens])).logits[0]


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    family, wrapped, overrides = CASES[case]
    reference = save_checkpoint(tmp_path, family, seed=3, wrapped=wrapped, **overrides)
    runner = make_runner(tmp_path)
    assert runner.spec.family == family
    tokens = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    expected = reference_logits(reference, tokens)
    assert expected.std() > 0.5  # logits that say something
    for chunks in ([40], [13, 9, 1, 1, 16], [1] * 40):
        got = engine_logits(runner, tokens, chunks)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_a_mixed_batch_matches_each_sequence_alone(tmp_path):
    reference = save_checkpoint(tmp_path, "qwen2", seed=5)
    runner = make_runner(tmp_path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (9, 14, 21)]
    bm = BlockManager(runner.num_blocks, runner.block_size)
    seqs = [Sequence(i, EngineRequest(str(i), p), i, runner.max_model_len)
            for i, p in enumerate(prompts)]
    with torch.inference_mode():
        # first step: seq 0 whole, seq 2 a first chunk
        plan = [(seqs[0], 0, 9), (seqs[2], 0, 8)]
        for seq, start, n in plan:
            bm.append(seq, n)
        inputs = runner.prepare([ScheduledSequence(s, st, n, False) for s, st, n in plan])
        runner.model(inputs.embeds, inputs.positions, runner.kv_cache, inputs.meta)
        seqs[0].num_computed_tokens, seqs[2].num_computed_tokens = 9, 8
        # second step: seq 0 decodes its last prompt token again as a new one, seq 1 from
        # scratch, seq 2 its rest over the cache; rows are laid out decodes first
        seqs[0].token_ids.append(prompts[0][-1])
        plan = [(seqs[1], 0, 14), (seqs[2], 8, 13), (seqs[0], 9, 1)]
        for seq, start, n in plan:
            bm.append(seq, n)
        inputs = runner.prepare([ScheduledSequence(s, st, n, True) for s, st, n in plan])
        hidden = runner.model(inputs.embeds, inputs.positions, runner.kv_cache, inputs.meta)
        logits = runner.model.compute_logits(hidden[inputs.sample_rows])
    full = [prompts[0] + [prompts[0][-1]], prompts[1], prompts[2]]
    expected = [reference_logits(reference, t)[-1] for t in full]
    torch.testing.assert_close(logits, torch.stack(expected), atol=ATOL, rtol=0)


@pytest.mark.skipif(not can_prepack(torch.device("cpu"), torch.float32),
                    reason="this torch build has no oneDNN")
@pytest.mark.parametrize("family", ["qwen2", "phi3"])  # tied lm_head and qkv bias; untied
@pytest.mark.parametrize("linear", ["onednn", "panels"])
def test_cpu_runs_prepacked_projections_and_the_dense_path_agrees(tmp_path, family, linear):
    if linear == "panels" and not cpu_kernels.load():
        pytest.skip(f"the CPU kernels cannot be built here: {cpu_kernels.error()}")
    reference = save_checkpoint(tmp_path, family, seed=4)
    runner = make_runner(tmp_path, small_batch_linear=False, cpu_linear=linear)
    model = runner.model
    assert all(layer.qkv.packed is not None and layer.down.packed is not None
               for layer in model.layers)
    assert model.packed_lm_head is not None
    # panels are a plain [out / 16, in, 16] tensor; oneDNN's layout is an opaque one
    panel_shape = (model.spec.vocab_size // 16, model.spec.hidden_size, 16)
    assert (tuple(model.packed_lm_head.shape) == panel_shape) == (linear == "panels")
    assert model.layers[0].gate_up.weight.numel() == 0  # the dense copy is released
    tokens = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    expected = reference_logits(reference, tokens)
    packed = engine_logits(runner, tokens, [17, 1, 12])
    runner.model = load_model(tmp_path, runner.device, runner.dtype, prepack=None)
    assert runner.model.layers[0].qkv.packed is None
    dense = engine_logits(runner, tokens, [17, 1, 12])
    torch.testing.assert_close(packed, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(dense, expected, atol=ATOL, rtol=0)


def test_phi3_config_file_reads_the_fused_layout(tmp_path):
    save_checkpoint(tmp_path, "phi3")
    spec = read_spec(tmp_path)
    assert (spec.family, spec.num_heads, spec.num_kv_heads, spec.head_dim) == ("phi3", 4, 2, 16)


def test_missing_weights_are_reported(tmp_path):
    save_checkpoint(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks .* llama weights"):
        make_runner(tmp_path)


def test_unknown_architecture_is_refused(tmp_path):
    save_checkpoint(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported model"):
        make_runner(tmp_path)


NATIVE_BF16 = can_prepack(torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("linear", [
    pytest.param("onednn", marks=pytest.mark.skipif(
        not NATIVE_BF16, reason="this CPU or torch build has no native bf16 matmuls")),
    pytest.param("panels", marks=pytest.mark.skipif(
        not (NATIVE_BF16 and cpu_kernels.has_bf16_dot() and cpu_kernels.load()),
        reason="bf16 panels need AVX-512 BF16 and the CPU kernels")),
    None,  # what CPUs without native bf16 run: dense weights, under the fused kernels
])
def test_bf16_is_as_close_to_fp32_as_transformers_bf16(tmp_path, linear):
    reference = save_checkpoint(tmp_path, "llama", seed=6)
    tokens = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    fp32 = reference_logits(reference, tokens)
    hf_bf16 = reference_logits(reference.to(torch.bfloat16), tokens).float()
    runner = make_runner(tmp_path, dtype="bfloat16", prepack_weights=linear is not None,
                         cpu_linear=linear or "auto")
    assert runner.dtype == torch.bfloat16 and runner.kv_cache.pool.dtype == torch.bfloat16
    packed = runner.model.layers[0].qkv.packed
    assert (packed is not None) == (linear is not None)
    assert (runner.model.packed_lm_head is not None) == (linear is not None)
    assert runner.panels == (linear == "panels")
    if packed is not None:
        assert (packed.dim() == 3) == (linear == "panels")
    ours = engine_logits(runner, tokens, [17, 1, 12]).float()
    # bf16 keeps 8 bits of mantissa: both drift from fp32 by about as much
    assert (ours - fp32).abs().max() <= 2 * (hf_bf16 - fp32).abs().max()
    agree = lambda logits: (logits.argmax(-1) == fp32.argmax(-1)).sum().item()  # noqa: E731
    assert agree(ours) >= agree(hf_bf16) - 2
