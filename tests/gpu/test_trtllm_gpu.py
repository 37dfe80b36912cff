"""The TensorRT-LLM engine on a real GPU with a tiny random Llama built in the test.

Runs where `tensorrt_llm` imports (NVIDIA's TensorRT-LLM container); skipped elsewhere.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from llm_service.engine.protocol import EmbeddingSpan, EngineRequest, FinishReason, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]
tensorrt_llm = pytest.importorskip("tensorrt_llm")

VOCAB, HIDDEN, MAX_BATCH, ROWS_PER_REQUEST = 512, 128, 4, 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer Llama (HF) and its TensorRT-LLM engine (paged KV, prompt table)."""
    from tensorrt_llm import BuildConfig, build
    from tensorrt_llm.models import LLaMAForCausalLM
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
    hf.save_pretrained(root / "hf")
    model = LLaMAForCausalLM.from_hugging_face(str(root / "hf"), dtype="float16")
    config = BuildConfig(max_batch_size=MAX_BATCH, max_input_len=128, max_seq_len=192,
                         max_num_tokens=512,
                         max_prompt_embedding_table_size=MAX_BATCH * ROWS_PER_REQUEST)
    config.plugin_config.use_paged_context_fmha = True
    build(model, config).save(str(root / "engine"))
    return hf.half().cuda().eval(), root / "engine"


@pytest.fixture
async def engine(tiny):
    from llm_service.engine.trtllm import TrtllmEngine

    engine = TrtllmEngine.from_options(tiny[1], {"free_gpu_memory_fraction": 0.2,
                                                 "stats_interval_s": 0.05})
    await engine.start()
    yield engine
    await asyncio.wait_for(engine.shutdown(), 60)


async def run(engine, request):
    tokens, last = [], None
    async for out in engine.generate(request):
        tokens += out.new_token_ids
        last = out
    return tokens, last


PROMPT = [5, 17, 42, 99, 100, 101, 7, 8, 250, 251, 3]


async def test_greedy_tokens_match_the_hf_model(engine, tiny):
    hf, _ = tiny
    tokens, last = await run(engine, EngineRequest("a", PROMPT, SamplingParams(
        max_tokens=8, temperature=0.0)))
    assert last.finish_reason == FinishReason.LENGTH and len(tokens) == 8
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]).cuda(), max_new_tokens=8, do_sample=False)
    # fp16 near-ties may flip a late token; the first ones must agree
    assert tokens[:4] == ref[0, len(PROMPT):len(PROMPT) + 4].tolist()


async def test_prompt_table_rows_act_like_the_tokens_they_embed(engine, tiny):
    hf, _ = tiny
    table = hf.get_input_embeddings().weight[PROMPT[2:8]].detach().float().cpu()
    spans = (EmbeddingSpan(2, table, "sha256:tokens-2-8"),)
    sampling = SamplingParams(max_tokens=6, temperature=0.0)
    as_text, _ = await run(engine, EngineRequest("t", PROMPT, sampling))
    as_rows, _ = await run(engine, EngineRequest("m", PROMPT, sampling, spans=spans))
    again, _ = await run(engine, EngineRequest("m2", PROMPT, sampling, spans=spans))
    assert as_rows == as_text == again


async def test_too_many_rows_are_refused(engine):
    from llm_service.errors import InvalidRequest

    spans = (EmbeddingSpan(0, torch.zeros(ROWS_PER_REQUEST + 1, HIDDEN), "sha256:big"),)
    with pytest.raises(InvalidRequest):
        await run(engine, EngineRequest("x", [1] * (ROWS_PER_REQUEST + 2), spans=spans))


async def test_abort_and_stats(engine):
    outputs = engine.generate(EngineRequest("long", PROMPT, SamplingParams(max_tokens=150)))
    await outputs.__anext__()
    await engine.abort("long")
    rest = [out async for out in outputs]
    assert rest[-1].finish_reason == FinishReason.ABORT
    await asyncio.sleep(0.3)
    stats = engine.stats()
    assert stats.kv_blocks_total > 0 and stats.running == 0
