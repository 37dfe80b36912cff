"""The GPU check: mmserve's torch code on a CUDA machine, one line per check.

    tests/gpu/device_check.sh               # on a CUDA machine (bf16, the full sizes)
    tests/gpu/device_check.sh --device cpu  # the dry run: every check, tiny sizes, fp32

Checks (each prints `[PASS]`, `[FAIL]` or `[INFO]` and one line of numbers):
- engine-greedy-batched: TorchEngine gives transformers' greedy tokens (same weights, device
  and dtype) for prompts running together, long ones prefilled in chunks.
- engine-greedy-preemption: the same with a KV pool so small that sequences are preempted
  and recomputed.
- tower-*: each encoder tower on the device against the same tower on the CPU in fp32.
- throughput-c*: TorchEngine tokens/s at concurrency c against transformers `generate` on
  the same ~1B-shaped random model, batch c.

Everything it needs is this checkout plus torch and transformers (and numpy, pillow,
safetensors, pyyaml, tqdm); the checkpoints are random and written to a temporary directory.
The exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), *(str(ROOT / "tests" / sub) for sub in ("", "e2e", "gpu"))]

from tower_checks import check_towers  # noqa: E402  (tests/gpu, beside this file)


@dataclass(frozen=True)
class Profile:
    """How big each check runs: the CUDA run, or the CPU dry run of the same code."""

    device: str
    dtype: str  # EngineConfig dtype name
    small: dict  # the model of the greedy checks
    big: dict  # the model of the throughput check (~1B parameters on CUDA)
    prompts: int  # prompts of the greedy checks
    new_tokens: int  # greedy tokens per prompt
    concurrency: tuple[int, ...]
    prompt_len: int  # throughput prompt length
    gen_tokens: int  # throughput tokens per request

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"bfloat16": torch.bfloat16, "float32": torch.float32}[self.dtype]


SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=2048, max_position_embeddings=2048,
             rms_norm_eps=1e-6, tie_word_embeddings=False)
ONE_B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
             max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(SMALL, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=512)

PROFILES = {
    "cuda": Profile("cuda", "bfloat16", SMALL, ONE_B, prompts=24, new_tokens=24,
                    concurrency=(1, 16, 64, 256), prompt_len=128, gen_tokens=64),
    "cpu": Profile("cpu", "float32", TINY, TINY, prompts=6, new_tokens=6,
                   concurrency=(1, 4), prompt_len=16, gen_tokens=4),
}


class Report:
    def __init__(self) -> None:
        self.failed = 0

    def line(self, status: str, name: str, text: str) -> None:
        self.failed += status == "FAIL"
        print(f"[{status}] {name}: {text}", flush=True)

    def check(self, ok: bool, name: str, text: str) -> None:
        self.line("PASS" if ok else "FAIL", name, text)


# --- models ---

def write_llama(directory: Path, dims: dict, device: str, dtype: torch.dtype, scale: float | None):
    """A random LlamaForCausalLM saved as a HF checkpoint; returns the model on `device`.

    scale: weights ~ N(0, scale) (norms 1 + N(0, 0.1)), so that logits differ clearly;
    None keeps transformers' own init (enough for timing).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**dims, bos_token_id=None, eos_token_id=None))
    if scale is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn_like(p)
                p.copy_(1.0 + 0.1 * noise if "norm" in name else scale * noise)
    model = model.to(dtype).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy tokens and the logits each was chosen from (KV cache, batch 1)."""
    ids = torch.tensor([prompt], device=model.device)
    out = model(ids, use_cache=True)
    tokens, logits = [], []
    for _ in range(steps):
        step_logits = out.logits[0, -1].float()
        token = int(step_logits.argmax())
        tokens.append(token)
        logits.append(step_logits)
        out = model(torch.tensor([[token]], device=model.device),
                    past_key_values=out.past_key_values, use_cache=True)
    return tokens, logits


def compare(expected: list[int], got: list[int], logits: list[torch.Tensor],
            tie: float) -> str:
    """"exact", "tie" (first divergence where transformers' top two are within `tie` of the
    logit scale, a rounding-order flip) or "wrong"."""
    for step, (want, have) in enumerate(zip(expected, got)):
        if want != have:
            row = logits[step]
            margin = float(row[want] - row[have])
            return "tie" if margin <= tie * float(row.abs().max()) else "wrong"
    return "exact" if len(got) == len(expected) else "wrong"


# --- TorchEngine ---

async def _run(engine, request) -> list[int]:
    tokens = []
    async for step in engine.generate(request):
        if step.error:
            raise RuntimeError(step.error)
        tokens += step.new_token_ids
    return tokens


async def engine_batches(config, batches) -> tuple[list[tuple[dict, float]], int]:
    """One TorchEngine; each batch of requests runs concurrently after the previous one.
    Returns (tokens per request id, seconds) per batch and the preemption count."""
    from llm_service.engine.async_engine import TorchEngine

    engine = TorchEngine(config)
    await engine.start()
    try:
        results = []
        for requests in batches:
            started = time.perf_counter()
            outputs = await asyncio.gather(*(_run(engine, r) for r in requests))
            elapsed = time.perf_counter() - started
            results.append(({r.request_id: out for r, out in zip(requests, outputs)}, elapsed))
        preemptions = engine.stats().num_preemptions
    finally:
        await engine.shutdown()
        del engine
        _release(config.device)
    return results, preemptions


def _release(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def kv_bytes_per_token(dims: dict, dtype: torch.dtype) -> int:
    head_dim = dims["hidden_size"] // dims["num_attention_heads"]
    return 2 * dims["num_hidden_layers"] * dims["num_key_value_heads"] * head_dim * dtype.itemsize


def greedy_prompts(profile: Profile) -> list[list[int]]:
    """Short, medium and long prompts; pairs share a prefix (the prefix cache is on)."""
    g = torch.Generator().manual_seed(1)
    vocab = profile.small["vocab_size"]
    longest = 320 if profile.device == "cuda" else 40
    lengths = [int(5 + (longest - 5) * i / max(profile.prompts - 1, 1))
               for i in range(profile.prompts)]
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    for i in range(1, len(prompts), 4):
        shared = min(len(prompts[i - 1]), len(prompts[i])) // 2
        prompts[i][:shared] = prompts[i - 1][:shared]
    return prompts


def check_greedy(report: Report, profile: Profile, work: Path) -> None:
    from llm_service.engine.config import EngineConfig
    from llm_service.engine.protocol import EngineRequest, SamplingParams

    directory = work / "small"
    model = write_llama(directory, profile.small, profile.device, profile.torch_dtype,
                        scale=1.5 / math.sqrt(profile.small["hidden_size"]))
    prompts = greedy_prompts(profile)
    token_bytes = kv_bytes_per_token(profile.small, profile.torch_dtype)
    tie = 0.02 if profile.dtype == "bfloat16" else 1e-4
    # The preemption run generates longer, so that every sequence crosses a block boundary
    # while the others hold the pool, whatever order the requests reach the engine in.
    runs = {
        # chunked prefill: a 64-token step budget splits every long prompt
        "engine-greedy-batched": (profile.new_tokens, 64),
        # room for about two of the longest sequences: the rest wait or are preempted
        "engine-greedy-preemption": (max(profile.new_tokens, 24), 2.2),
    }
    # Greedy steps do not depend on how many follow: one reference, cut to each run's length.
    longest_run = max(new_tokens for new_tokens, _ in runs.values())
    full = [hf_greedy(model, p, longest_run) for p in prompts]
    for name, (new_tokens, pool_sequences) in runs.items():
        reference = [(tokens[:new_tokens], logits[:new_tokens]) for tokens, logits in full]
        sampling = SamplingParams(max_tokens=new_tokens, temperature=0.0)
        requests = [EngineRequest(f"r{i}", p, sampling) for i, p in enumerate(prompts)]
        longest = max(map(len, prompts)) + new_tokens
        config = EngineConfig(model_dir=directory, device=profile.device, dtype=profile.dtype,
                              block_size=16, max_num_seqs=16, max_num_batched_tokens=64,
                              kv_cache_bytes=int(pool_sequences * longest * token_bytes))
        [(got, _)], preemptions = asyncio.run(engine_batches(config, [requests]))
        verdicts = [compare(tokens, got[r.request_id], logits, tie)
                    for r, (tokens, logits) in zip(requests, reference)]
        ok = "wrong" not in verdicts and (name != "engine-greedy-preemption" or preemptions > 0)
        report.check(ok, name, f"{verdicts.count('exact')}/{len(verdicts)} identical, "
                     f"{verdicts.count('tie')} diverge at a near-tie (top-2 within "
                     f"{tie:g} of the logit scale), {verdicts.count('wrong')} wrong; "
                     f"prompts 5-{max(map(len, prompts))} tokens, {new_tokens} new, "
                     f"{preemptions} preemptions, {profile.device} {profile.dtype}")
    del model
    _release(profile.device)


# --- throughput ---

def check_throughput(report: Report, profile: Profile, work: Path) -> None:
    from transformers import GenerationConfig

    from llm_service.engine.config import EngineConfig
    from llm_service.engine.protocol import EngineRequest, SamplingParams

    directory = work / "big"
    started = time.perf_counter()
    model = write_llama(directory, profile.big, profile.device, profile.torch_dtype, scale=None)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    report.line("INFO", "throughput-model", f"{params:.2f} B parameters, written in "
                f"{time.perf_counter() - started:.0f} s")
    vocab, n_new = profile.big["vocab_size"], profile.gen_tokens
    generation = GenerationConfig(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    sampling = SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True)
    top, seq_len = max(profile.concurrency), profile.prompt_len + n_new
    config = EngineConfig(model_dir=directory, device=profile.device, dtype=profile.dtype,
                          max_num_seqs=top, max_num_batched_tokens=max(2048, top),
                          max_model_len=seq_len + 16,
                          kv_cache_bytes=2 * top * (seq_len + 32)
                          * kv_bytes_per_token(profile.big, profile.torch_dtype))
    g = torch.Generator().manual_seed(2)
    prompts = {c: torch.randint(0, vocab, (c, profile.prompt_len), generator=g)
               for c in profile.concurrency}
    batches = [[EngineRequest("warm-up", prompts[top][0].tolist(), sampling)]]
    batches += [[EngineRequest(f"t{c}-{i}", row.tolist(), sampling)
                 for i, row in enumerate(prompts[c])] for c in profile.concurrency]
    # The engine runs first and is gone before transformers needs the memory for its caches.
    engine_runs, _ = asyncio.run(engine_batches(config, batches))
    for c, (got, engine_s) in zip(profile.concurrency, engine_runs[1:]):
        ids = prompts[c].to(profile.device)
        with torch.inference_mode():
            model.generate(ids, generation_config=generation)  # warm-up at this batch size
            _sync(profile.device)
            started = time.perf_counter()
            model.generate(ids, generation_config=generation)
            _sync(profile.device)
            hf_s = time.perf_counter() - started
        produced = sum(map(len, got.values()))
        engine_rate, hf_rate = produced / engine_s, c * n_new / hf_s
        report.check(produced == c * n_new, f"throughput-c{c}",
                     f"engine {engine_rate:.0f} tok/s vs transformers generate "
                     f"{hf_rate:.0f} tok/s = {engine_rate / hf_rate:.2f}x (prompt "
                     f"{profile.prompt_len}, {n_new} new, {profile.device} {profile.dtype})")
    del model
    _release(profile.device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(PROFILES), default="cuda",
                        help="cuda: the real check; cpu: the dry run (tiny sizes, fp32)")
    parser.add_argument("--only", choices=["greedy", "towers", "throughput"], action="append",
                        help="run only these groups (default: all)")
    args = parser.parse_args(argv)
    profile = PROFILES[args.device]
    report = Report()
    if profile.device == "cuda" and not torch.cuda.is_available():
        report.line("FAIL", "env", "no CUDA device: run with --device cpu for the dry run")
        return 1
    import transformers

    name = torch.cuda.get_device_name() if profile.device == "cuda" else "cpu (dry run)"
    report.line("INFO", "env", f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
                f"transformers {transformers.__version__}, {name}")
    groups = args.only or ["greedy", "towers", "throughput"]
    with tempfile.TemporaryDirectory(prefix="mmserve-device-check-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        if "greedy" in groups:
            check_greedy(report, profile, work)
        if "towers" in groups:
            check_towers(report, profile.device, work)
        if "throughput" in groups:
            check_throughput(report, profile, work)
    report.line("INFO", "done", f"{report.failed} failed, {time.perf_counter() - started:.0f} s")
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
