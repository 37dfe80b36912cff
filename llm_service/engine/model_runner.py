"""Turns a scheduled step into tensors, runs the model over the paged KV cache and samples."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from llm_service.engine import cpu_kernels
from llm_service.engine.config import CPU_KV_CACHE_BYTES, EngineConfig
from llm_service.engine.cpu_tuning import keep_freed_memory
from llm_service.engine.models.attention import AttentionMetadata, KVCache, PrefillRun
from llm_service.engine.models.loader import load_model, read_spec
from llm_service.engine.outputs import RunnerOutput, ScheduledSequence, SchedulerOutput
from llm_service.engine.protocol import TokenLogprob
from llm_service.engine.sampler import Sampler
from llm_service.engine.sequence import Sequence

log = logging.getLogger(__name__)

PAGED_PREFILL_FP32 = 1024  # fp32 prompt chunks ending within this many tokens: paged_prefill
SKINNY_ROWS = 4  # the skinny kernel beats oneDNN up to here (fp32; 2 cores, 27 GB/s memory)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


@dataclass(slots=True)
class StepInputs:
    embeds: torch.Tensor  # [T, hidden]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_rows: list[int]  # per sampling sequence: the row whose logits give its next token
    sample_seqs: list[Sequence]
    sample_index: list[int]  # per sampling sequence: its index in SchedulerOutput.scheduled


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        spec = read_spec(config.model_dir)
        max_len = config.max_model_len or spec.max_position_embeddings
        if max_len > spec.max_position_embeddings:
            raise ValueError(f"max_model_len {max_len} exceeds the model's "
                             f"max_position_embeddings {spec.max_position_embeddings}")
        on_cpu = self.device.type == "cpu"
        if on_cpu and config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)
        if on_cpu and config.keep_freed_memory and not keep_freed_memory():
            log.info("not glibc: freed memory goes back to the kernel (more page faults)")
        self.kernels = on_cpu and self._load_kernels(config.cpu_kernels)
        self.panels = self._use_panels(config.cpu_linear, config.prepack_weights)
        # panel_linear reads its panels at the memory's speed at a few rows too: no dense copy
        skinny = (self.kernels and self.dtype == torch.float32 and config.small_batch_linear
                  and not self.panels)
        self.model = load_model(config.model_dir, self.device, self.dtype, max_len,
                                prepack=config.max_num_seqs if config.prepack_weights else None,
                                keep_dense=skinny, panels=self.panels)
        self.model.use_cpu_kernels(self.kernels, SKINNY_ROWS if skinny else 0)
        self.spec = spec
        self.block_size = config.block_size
        per_block = KVCache.bytes_per_block(spec.num_layers, config.block_size, spec.num_kv_heads,
                                            spec.head_dim, self.dtype)
        num_blocks = self._kv_budget(config) // per_block
        if num_blocks < 1:
            raise ValueError(f"the KV budget holds no block of {per_block} bytes; raise "
                             f"kv_cache_bytes or kv_cache_fraction")
        self.kv_cache = KVCache(spec.num_layers, num_blocks, config.block_size, spec.num_kv_heads,
                                spec.head_dim, self.dtype, self.device)
        # A sequence alone must always fit, or preemption could never make progress.
        self.max_model_len = min(max_len, num_blocks * config.block_size)
        if self.max_model_len < max_len:
            log.warning("max_model_len lowered from %d to %d to fit the KV pool (%d blocks)",
                        max_len, self.max_model_len, num_blocks)
        self.sampler = Sampler(config.seed, cpu_kernel=self.kernels)

    def _use_panels(self, mode: str, prepack: bool) -> bool:
        """Whether the projections run mmserve::panel_linear (see EngineConfig.cpu_linear)."""
        fits = self.kernels and prepack and (
            (self.dtype == torch.float32 and cpu_kernels.has_fma_vectors())
            or (self.dtype == torch.bfloat16 and cpu_kernels.has_bf16_dot()))
        if mode == "panels" and not fits:
            raise ValueError(
                f"cpu_linear is 'panels' but panel_linear cannot run {self.dtype} here: it needs "
                f"the CPU kernels, prepack_weights, and AVX2 + FMA (float32) or AVX-512 BF16 "
                f"(bfloat16); use 'auto' or 'onednn'")
        return fits and mode != "onednn"

    def _load_kernels(self, mode: str) -> bool:
        if mode == "off":
            return False
        if cpu_kernels.load():
            return True
        if mode == "on":
            raise ValueError(f"cpu_kernels is 'on' but they cannot be built here: "
                             f"{cpu_kernels.error()}")
        return False

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

    def _kv_budget(self, config: EngineConfig) -> int:
        if config.kv_cache_bytes is not None:
            return config.kv_cache_bytes
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * config.kv_cache_fraction)
        return CPU_KV_CACHE_BYTES

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> RunnerOutput:
        for seq_id in step.finished_seq_ids:
            self.sampler.forget(seq_id)
        inputs = self.prepare(step.scheduled)
        hidden = self.model(inputs.embeds, inputs.positions, self.kv_cache, inputs.meta)
        token_ids: list[int | None] = [None] * len(step.scheduled)
        if not inputs.sample_rows:
            return RunnerOutput(token_ids)
        rows = torch.tensor(inputs.sample_rows, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        tokens, logprobs = self.sampler(logits, inputs.sample_seqs)
        for k, index in enumerate(inputs.sample_index):
            token_ids[index] = tokens[k]
        if logprobs is None:
            return RunnerOutput(token_ids)
        ordered: list[TokenLogprob | None] = [None] * len(step.scheduled)
        for k, index in enumerate(inputs.sample_index):
            ordered[index] = logprobs[k]
        return RunnerOutput(token_ids, ordered)

    def paged_prefill(self, item: ScheduledSequence) -> bool:
        """Whether a prompt chunk's rows are attended by mmserve::paged_decode, one row at a
        time, instead of by SDPA. On 2 cores (SmolLM2's 9 / 3 heads of 64) the kernel took
        133 us for a 128-token prompt where torch's flash SDPA took 358 (bf16; fp32: 163 vs
        334), and 25 vs 43 ms at 2048 tokens in bf16; in fp32 it falls behind past ~1k."""
        if not self.kernels or item.num_tokens == 1:
            return False
        return self.dtype == torch.bfloat16 or item.start + item.num_tokens <= PAGED_PREFILL_FP32

    def prepare(self, scheduled: list[ScheduledSequence]) -> StepInputs:
        """Flat step inputs; rows are laid out paged rows first (the decodes, then the prompt
        chunks paged_prefill takes), then one SDPA run per other prompt chunk."""
        bs = self.block_size
        decodes = [i for i, s in enumerate(scheduled) if s.num_tokens == 1]
        paged = [i for i, s in enumerate(scheduled) if self.paged_prefill(s)]
        taken = set(decodes) | set(paged)
        order = decodes + paged + [i for i in range(len(scheduled)) if i not in taken]
        paged_rows = len(decodes) + sum(scheduled[i].num_tokens for i in paged)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills: list[PrefillRun] = []
        sample_rows, sample_seqs, sample_index = [], [], []
        for index in order:
            item = scheduled[index]
            seq, start, end = item.seq, item.start, item.start + item.num_tokens
            table = seq.block_table
            row = len(ids)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if row >= paged_rows:
                prefills.append(self._prefill_run(row, start, end, table))
            if item.sample:
                sample_rows.append(row + item.num_tokens - 1)
                sample_seqs.append(seq)
                sample_index.append(index)
        dev = self.device
        ids_t = torch.tensor(ids, device=dev).clamp_(0, self.spec.vocab_size - 1)
        embeds = self.model.embed(ids_t)
        self._write_spans(embeds, [scheduled[i] for i in order])
        meta = AttentionMetadata(torch.tensor(slots, device=dev), paged_rows, None, 0, None,
                                 prefills, kernel=self.kernels)
        self._paged_tables([scheduled[i] for i in decodes + paged], meta)
        return StepInputs(embeds, torch.tensor(positions, device=dev), meta, sample_rows,
                          sample_seqs, sample_index)

    def _prefill_run(self, row: int, start: int, end: int, table: list[int]) -> PrefillRun:
        n = end - start
        if start == 0:
            return PrefillRun(row, row + n, n, None, None)
        dev = self.device
        blocks = torch.tensor(table[: -(-end // self.block_size)], device=dev)
        keys = torch.arange(end, device=dev).unsqueeze(0)
        queries = torch.arange(start, end, device=dev).unsqueeze(1)
        mask = torch.zeros(n, end, dtype=self.dtype, device=dev).masked_fill_(
            keys > queries, float("-inf"))
        return PrefillRun(row, row + n, end, blocks, mask)

    def _paged_tables(self, items: list[ScheduledSequence], meta: AttentionMetadata) -> None:
        """Per paged row, its sequence's padded block table and its context length (the
        kernel: a prompt row's context ends at its own position), or the padding mask over
        the longest context (plain torch, where every paged row is a decode)."""
        if not items:
            return
        lengths = [p + 1 for d in items for p in range(d.start, d.start + d.num_tokens)]
        longest = max(lengths)
        width = -(-longest // self.block_size)
        tables = [d.seq.block_table[:width] for d in items]
        dev = self.device
        padded = [t + [0] * (width - len(t)) for t in tables]
        meta.decode_len = longest
        if meta.kernel:
            blocks = torch.tensor(padded, dtype=torch.int32)
            if len(lengths) > len(items):  # a prompt chunk's rows share its table
                blocks = blocks.repeat_interleave(
                    torch.tensor([d.num_tokens for d in items]), dim=0)
            meta.decode_blocks = blocks
            meta.decode_lens = torch.tensor(lengths, dtype=torch.int32)
            return
        meta.decode_blocks = torch.tensor(padded, device=dev)
        if min(lengths) == longest:  # nothing to mask: SDPA's fast path (always for one decode)
            return
        keys = torch.arange(longest, device=dev).unsqueeze(0)
        valid = keys < torch.tensor(lengths, device=dev).unsqueeze(1)
        mask = torch.zeros(len(items), longest, dtype=self.dtype, device=dev)
        mask.masked_fill_(~valid, float("-inf"))
        meta.decode_mask = mask.view(len(items), 1, 1, -1)

    def _write_spans(self, embeds: torch.Tensor, items: list[ScheduledSequence]) -> None:
        row = 0
        for item in items:
            seq, start, end = item.seq, item.start, item.start + item.num_tokens
            for span in seq.spans if start < seq.num_prompt_tokens else ():
                lo, hi = max(start, span.start), min(end, span.end)
                if lo < hi:
                    rows = span.embeddings[lo - span.start: hi - span.start]
                    embeds[row + lo - start: row + hi - start] = rows.to(embeds.device,
                                                                         embeds.dtype)
            row += item.num_tokens
