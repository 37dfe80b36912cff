"""The Llama-family decoder (Llama, Qwen2, InternLM2, Phi-3) with fused qkv and gate_up weights.

The families differ only in their checkpoints' weight names and layouts (see loader.py), in
biases, and in rope scaling; the computation is the same.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm_service.engine.cpu_tuning import cpu_packed_linear, pack_for_cpu
from llm_service.engine.models.attention import (
    AttentionMetadata, KVCache, LayerCache, paged_attention)
from llm_service.engine.models.rope import RopeSpec, RotaryEmbedding, apply_rotary


@dataclass(frozen=True, slots=True)
class DecoderSpec:
    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope: RopeSpec
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                fused: bool = False) -> torch.Tensor:
        """RMSNorm(x); with `residual`: adds x into it (in place) and normalises the sum."""
        if fused:
            if residual is None:
                return torch.ops.mmserve.rms_norm(x, self.weight, self.eps)
            return torch.ops.mmserve.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = residual.add_(x)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear that can hand its weight to a packed CPU matmul.

    On CPU, `prepack()` reorders the weight once into oneDNN's blocked layout (as vLLM's and
    SGLang's CPU backends do), or, with `panels`, into mmserve::panel_linear's k-major panels
    (faster than oneDNN at decode's row counts; see cpu_tuning.pack_for_cpu); either packed
    matmul runs about twice as fast as the MKL path for the few rows of a decode step and
    still faster for long prefills. The dense weight is dropped then: the packed copy is all
    the layer reads.
    """

    weight: nn.Parameter

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.requires_grad_(False)
        self.packed: torch.Tensor | None = None
        self.skinny_rows = 0  # steps of up to this many rows run mmserve::skinny_linear

    def prepack(self, batch_hint: int, keep_dense: bool = False, panels: bool = False) -> None:
        self.packed = pack_for_cpu(self.weight, batch_hint, panels)
        if not keep_dense:
            self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.skinny_rows:
            return torch.ops.mmserve.skinny_linear(x, self.weight, self.bias)
        if self.packed is not None:
            return cpu_packed_linear(x, self.packed, self.bias)
        if x.is_cuda:
            return F.linear(x, self.weight, self.bias)
        # Unpacked on CPU (bf16 without native bf16 matmuls, or prepack_weights off):
        # (W @ x^T)^T runs faster in MKL than x @ W^T for a few rows. Rows come back dense:
        # the fused kernels downstream take contiguous [rows, features].
        if self.bias is None:
            y = torch.mm(self.weight, x.t())
        else:
            y = torch.addmm(self.bias.unsqueeze(1), self.weight, x.t())
        return y.t().contiguous()


@dataclass(slots=True)
class StepRope:
    """A step's rotary inputs: the tables and positions (fused ops) or the looked-up rows."""

    positions: torch.Tensor  # [T] int64
    table: RotaryEmbedding
    cos: torch.Tensor | None = None  # [T, 1, rotary_dim]; plain-torch path only
    sin: torch.Tensor | None = None


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            spec.num_heads, spec.num_kv_heads, spec.head_dim)
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.input_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.qkv = Linear(spec.hidden_size, q_size + 2 * kv_size, spec.qkv_bias)
        self.o = Linear(q_size, spec.hidden_size, spec.o_bias)
        self.post_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.gate_up = Linear(spec.hidden_size, 2 * spec.intermediate_size, spec.mlp_bias)
        self.down = Linear(spec.intermediate_size, spec.hidden_size, spec.mlp_bias)
        self.fused = False  # CPU kernels for the element-wise steps (DecoderLM.use_cpu_kernels)

    def forward(self, h: torch.Tensor | None, residual: torch.Tensor, rope: StepRope,
                cache: LayerCache, meta: AttentionMetadata) -> torch.Tensor:
        """h: the previous layer's output (None for the first layer); residual: the stream so
        far, which h is added into (in place). Returns this layer's output."""
        fused = self.fused
        x = self.input_norm(residual, None, fused) if h is None else \
            self.input_norm(h, residual, fused)
        q, k, v = self._rotate_and_cache(self.qkv(x), rope, cache, meta)
        h = self.o(paged_attention(q, k, v, cache, meta))
        x = self.post_norm(h, residual, fused)
        gate_up = self.gate_up(x)
        if fused:
            return self.down(torch.ops.mmserve.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

    def _rotate_and_cache(self, qkv: torch.Tensor, rope: StepRope, cache: LayerCache,
                          meta: AttentionMetadata):
        """q, k, v views of the projected rows with rope applied; k and v go into the cache."""
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = qkv.contiguous()  # attention kernels want the head dim dense
        if self.fused:
            torch.ops.mmserve.rope_and_cache(qkv, rope.table.cos, rope.table.sin, rope.positions,
                                             cache.k, cache.v, meta.slot_mapping, heads, kv_heads)
            rows = qkv.view(qkv.shape[0], -1, self.head_dim)
            return rows[:, :heads], rows[:, heads: heads + kv_heads], rows[:, heads + kv_heads:]
        rows = qkv.view(qkv.shape[0], -1, self.head_dim)
        qk = apply_rotary(rows[:, : heads + kv_heads], rope.cos, rope.sin)
        q, k = qk.split((heads, kv_heads), dim=1)
        v = rows[:, heads + kv_heads:]
        cache.write(k, v, *meta.slot_index(cache.block_size))
        return q, k, v


class DecoderLM(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.embed.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = None if spec.tie_word_embeddings else nn.Parameter(
            torch.empty(spec.vocab_size, spec.hidden_size), requires_grad=False)
        self.rotary: RotaryEmbedding | None = None
        self.packed_lm_head: torch.Tensor | None = None
        self.fused = False
        self.skinny_rows = 0

    def setup_rotary(self, max_len: int) -> None:
        weight = self.embed.weight
        self.rotary = RotaryEmbedding(self.spec.rope, max_len, weight.device, weight.dtype)

    def use_cpu_kernels(self, enabled: bool = True, skinny_rows: int = 0) -> None:
        """Runs norms, rope, the cache writes and silu-and-mul as the fused CPU kernels
        (`cpu_kernels.load()` must have succeeded); with `skinny_rows`, projections that kept
        their dense weight run steps of up to that many rows on mmserve::skinny_linear."""
        self.fused = enabled
        for layer in self.layers:
            layer.fused = enabled
        for module in self.modules():
            if isinstance(module, Linear):
                module.skinny_rows = skinny_rows if enabled and module.weight.numel() else 0
        self.skinny_rows = skinny_rows if enabled else 0

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        """[T, hidden] input embeddings -> [T, hidden] hidden states before the final norm.
        `embeds` becomes the residual stream: it is updated in place."""
        assert self.rotary is not None, "setup_rotary() comes before the first step"
        rope = StepRope(positions, self.rotary)
        if not self.fused:
            rope.cos, rope.sin = self.rotary.lookup(positions)
        h = None
        for i, layer in enumerate(self.layers):
            h = layer(h, embeds, rope, kv_cache.layer(i), meta)
        return embeds.add_(h) if h is not None else embeds

    def prepack(self, batch_hint: int, keep_dense: bool = False, panels: bool = False) -> None:
        """CPU: every projection and the lm_head move to a packed layout (oneDNN's, or with
        `panels` mmserve::panel_linear's; see Linear). A tied lm_head gets a packed copy; the
        embedding table stays for lookups. `keep_dense`: the dense weights stay too, for the
        skinny kernel."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepack(batch_hint, keep_dense, panels)
        if self.lm_head is None:
            self.packed_lm_head = pack_for_cpu(self.embed.weight, batch_hint, panels)
        else:
            self.packed_lm_head = pack_for_cpu(self.lm_head, batch_hint, panels)
            if not keep_dense:
                self.lm_head = nn.Parameter(self.lm_head.new_empty(0), requires_grad=False)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(hidden.contiguous(), None, self.fused)
        if hidden.shape[0] <= self.skinny_rows:
            weight = self.embed.weight if self.lm_head is None else self.lm_head
            if weight.numel():
                return torch.ops.mmserve.skinny_linear(hidden, weight, None)
        if self.packed_lm_head is not None:
            return cpu_packed_linear(hidden, self.packed_lm_head, None)
        weight = self.embed.weight if self.lm_head is None else self.lm_head
        return F.linear(hidden, weight) if hidden.is_cuda else torch.mm(weight, hidden.t()).t()


WeightTransform = Callable[[torch.Tensor, DecoderSpec], torch.Tensor]
Rule = tuple[str, str, "str | None", "WeightTransform | None"]  # regex, param, shard, transform


@dataclass(frozen=True, slots=True)
class Family:
    """How one family's checkpoint names and layouts map onto DecoderLM's parameters."""

    model_type: str
    architectures: tuple[str, ...]
    rules: tuple[Rule, ...]
    qkv_bias: bool = False

    def map_name(self, name: str) -> tuple[str, str | None, WeightTransform | None] | None:
        """HF weight name -> (parameter name, shard of a fused parameter, transform)."""
        for pattern, target, shard, transform in self.rules:
            m = re.fullmatch(pattern, name)
            if m:
                return target.format(*m.groups()), shard, transform
        return None


def deinterleave_wqkv(w: torch.Tensor, spec: DecoderSpec) -> torch.Tensor:
    """InternLM2 stores qkv per KV head as [q * group, k, v]; DecoderLM wants [q..., k..., v...]."""
    group = spec.num_heads // spec.num_kv_heads
    rows = w.reshape(spec.num_kv_heads, group + 2, spec.head_dim, -1)
    parts = (rows[:, :group], rows[:, group], rows[:, group + 1])
    return torch.cat([p.reshape(-1, *w.shape[1:]) for p in parts])


_L = r"model\.layers\.(\d+)\."
_NORMS_AND_OUTPUTS: tuple[Rule, ...] = (
    (r"model\.embed_tokens\.weight", "embed.weight", None, None),
    (r"model\.norm\.weight", "norm.weight", None, None),
    (r"lm_head\.weight", "lm_head", None, None),
    (_L + r"input_layernorm\.weight", "layers.{0}.input_norm.weight", None, None),
    (_L + r"post_attention_layernorm\.weight", "layers.{0}.post_norm.weight", None, None),
    (_L + r"self_attn\.o_proj\.(weight|bias)", "layers.{0}.o.{1}", None, None),
    (_L + r"mlp\.down_proj\.(weight|bias)", "layers.{0}.down.{1}", None, None),
)
_SEPARATE_PROJECTIONS: tuple[Rule, ...] = (
    (_L + r"self_attn\.q_proj\.(weight|bias)", "layers.{0}.qkv.{1}", "q", None),
    (_L + r"self_attn\.k_proj\.(weight|bias)", "layers.{0}.qkv.{1}", "k", None),
    (_L + r"self_attn\.v_proj\.(weight|bias)", "layers.{0}.qkv.{1}", "v", None),
    (_L + r"mlp\.gate_proj\.(weight|bias)", "layers.{0}.gate_up.{1}", "gate", None),
    (_L + r"mlp\.up_proj\.(weight|bias)", "layers.{0}.gate_up.{1}", "up", None),
)
LLAMA = Family("llama", ("LlamaForCausalLM",), _NORMS_AND_OUTPUTS + _SEPARATE_PROJECTIONS)
MISTRAL = Family("mistral", ("MistralForCausalLM",), _NORMS_AND_OUTPUTS + _SEPARATE_PROJECTIONS)
QWEN2 = Family("qwen2", ("Qwen2ForCausalLM",), _NORMS_AND_OUTPUTS + _SEPARATE_PROJECTIONS,
               qkv_bias=True)
PHI3 = Family("phi3", ("Phi3ForCausalLM",), _NORMS_AND_OUTPUTS + (
    (_L + r"self_attn\.qkv_proj\.weight", "layers.{0}.qkv.weight", None, None),
    (_L + r"mlp\.gate_up_proj\.weight", "layers.{0}.gate_up.weight", None, None),
))
INTERNLM2 = Family("internlm2", ("InternLM2ForCausalLM",), (
    (r"model\.tok_embeddings\.weight", "embed.weight", None, None),
    (r"model\.norm\.weight", "norm.weight", None, None),
    (r"output\.weight", "lm_head", None, None),
    (_L + r"attention_norm\.weight", "layers.{0}.input_norm.weight", None, None),
    (_L + r"ffn_norm\.weight", "layers.{0}.post_norm.weight", None, None),
    (_L + r"attention\.wqkv\.(weight|bias)", "layers.{0}.qkv.{1}", None, deinterleave_wqkv),
    (_L + r"attention\.wo\.(weight|bias)", "layers.{0}.o.{1}", None, None),
    (_L + r"feed_forward\.w1\.weight", "layers.{0}.gate_up.weight", "gate", None),
    (_L + r"feed_forward\.w3\.weight", "layers.{0}.gate_up.weight", "up", None),
    (_L + r"feed_forward\.w2\.weight", "layers.{0}.down.weight", None, None),
))

_H = r"transformer\.h\.(\d+)\."
# Qwen (v1, Qwen-VL-Chat's LLM): fused c_attn with bias; MLP is c_proj(w1(x) * silu(w2(x))).
QWEN = Family("qwen", ("QWenLMHeadModel",), (
    (r"transformer\.wte\.weight", "embed.weight", None, None),
    (r"transformer\.ln_f\.weight", "norm.weight", None, None),
    (r"lm_head\.weight", "lm_head", None, None),
    (_H + r"ln_1\.weight", "layers.{0}.input_norm.weight", None, None),
    (_H + r"ln_2\.weight", "layers.{0}.post_norm.weight", None, None),
    (_H + r"attn\.c_attn\.(weight|bias)", "layers.{0}.qkv.{1}", None, None),
    (_H + r"attn\.c_proj\.weight", "layers.{0}.o.weight", None, None),
    (_H + r"mlp\.w2\.weight", "layers.{0}.gate_up.weight", "gate", None),
    (_H + r"mlp\.w1\.weight", "layers.{0}.gate_up.weight", "up", None),
    (_H + r"mlp\.c_proj\.weight", "layers.{0}.down.weight", None, None),
), qkv_bias=True)

