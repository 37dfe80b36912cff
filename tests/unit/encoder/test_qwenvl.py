"""Qwen-VL-Chat: pixels against the reference transform, the tower against visual.py's maths."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from encoder_service.config import EncoderConfig
from encoder_service.encoder import Encoder
from encoder_service.families import build_preprocessor
from encoder_service.families.qwenvl import CLIP_MEAN, CLIP_STD
from encoder_service.server import EncoderServicer, encoder_pb2
from encoder_service.towers import build_tower
from encoder_service.towers.qwenvl import QwenVLTower, sincos_pos_embed_2d
from hf_layouts import make_rand, qwen_visual_state
from mmserve.wire.media import MediaItem, MediaRef

IMAGE, PATCH, WIDTH, HEADS, LAYERS, OUT, QUERIES = 56, 14, 32, 4, 2, 256, 4
VISUAL = dict(image_size=IMAGE, patch_size=PATCH, width=WIDTH, heads=HEADS, layers=LAYERS,
              mlp_ratio=2.5, output_dim=OUT, n_queries=QUERIES, image_start_id=151857)


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array, "RGB").convert(mode)


def reference_pixels(image: Image.Image) -> torch.Tensor:
    """visual.py: convert("RGB"), Resize((448, 448), BICUBIC), ToTensor, Normalize(CLIP)."""
    image = image.convert("RGB").resize((448, 448), Image.BICUBIC)
    tensor = torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1)
    tensor = tensor.contiguous().to(torch.float32).div(255)
    mean, std = torch.as_tensor(CLIP_MEAN), torch.as_tensor(CLIP_STD)
    return tensor.sub_(mean[:, None, None]).div_(std[:, None, None])


@pytest.mark.parametrize("size,mode", [((1000, 600), "RGB"), ((300, 200), "RGB"),
                                       ((448, 448), "RGB"), ((640, 480), "L"),
                                       ((333, 777), "RGBA")])
def test_pixels_are_bit_equal_to_the_reference_transform(size, mode):
    image = noise_image(*size, mode=mode)
    prepared = build_preprocessor(EncoderConfig(family="qwen-vl-chat")).preprocess(image, 12)
    assert (prepared.num_tiles, prepared.num_tokens) == (1, 256)
    assert torch.equal(prepared.pixel_values, reference_pixels(image).unsqueeze(0))


def test_plan_is_one_tile_of_256_rows_whatever_the_size():
    preprocessor = build_preprocessor(EncoderConfig(family="qwen-vl-chat"))
    for size in ((2000, 200), (448, 448), (20, 30)):
        plan = preprocessor.plan(noise_image(*size), 12)
        assert (plan.grid, plan.num_tiles, plan.num_tokens) == ((1, 1), 1, 256)
    image = noise_image(64, 48)
    assert preprocessor.content_hash(image, 12) == preprocessor.content_hash(image.copy(), 1)
    other = noise_image(64, 48, seed=1)
    assert preprocessor.content_hash(image, 12) != preprocessor.content_hash(other, 12)


def original_sincos(dim: int, grid_size: int) -> np.ndarray:
    """get_2d_sincos_pos_embed from visual.py (numpy, float32)."""
    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32),
                                np.arange(grid_size, dtype=np.float32)), axis=0)
    grid = grid.reshape([2, 1, grid_size, grid_size])

    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float32)
        omega /= d / 2.0
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def test_sincos_table_matches_the_original():
    expected = torch.from_numpy(original_sincos(OUT, 16)).float()
    torch.testing.assert_close(sincos_pos_embed_2d(OUT, 16), expected, atol=1e-6, rtol=0)


def write_checkpoint(path, seed: int = 0, queries: int = QUERIES, image_size: int = IMAGE) -> dict:
    visual = {**VISUAL, "n_queries": queries, "image_size": image_size}
    rand = make_rand(seed, 0.2)
    v = "transformer.visual."
    sd = qwen_visual_state(rand, visual)
    sd[v + "attn_pool.pos_embed"] = torch.from_numpy(original_sincos(OUT, int(queries ** 0.5)))
    sd["transformer.wte.weight"] = rand(10, OUT)
    save_file({k: t.contiguous() for k, t in sd.items()}, str(path / "model.safetensors"))
    config = {"architectures": ["QWenLMHeadModel"], "hidden_size": OUT, "visual": visual,
              "torch_dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(config))
    return {k[len(v):]: t for k, t in sd.items() if k.startswith(v)}


def original_get_abs_pos(abs_pos, tgt_size):
    src, tgt = int(math.sqrt(abs_pos.size(0))), int(math.sqrt(tgt_size))
    if src == tgt:
        return abs_pos
    return F.interpolate(abs_pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2),
                         size=(tgt, tgt), mode="bicubic", align_corners=False
                         ).permute(0, 2, 3, 1).flatten(0, 2)


def original_visual_attention(x, sd, p):
    """VisualAttention.forward on [sq, b, h] (LND)."""
    sq, b, width = x.shape
    hn = width // HEADS
    mixed = F.linear(x, sd[p + "in_proj.weight"], sd[p + "in_proj.bias"]).view(sq, b, HEADS, 3 * hn)
    q, k, v = mixed.split(hn, dim=-1)
    q = q.reshape(sq, b * HEADS, hn).transpose(0, 1)
    k = k.reshape(sq, b * HEADS, hn).transpose(0, 1)
    probs = torch.bmm(q / math.sqrt(hn), k.transpose(-2, -1)).softmax(dim=-1)
    v = v.reshape(sq, b * HEADS, hn).transpose(0, 1)
    context = torch.bmm(probs, v).view(b, HEADS, sq, hn).permute(2, 0, 1, 3).contiguous()
    return F.linear(context.view(sq, b, width), sd[p + "out_proj.weight"], sd[p + "out_proj.bias"])


def reference_forward(sd, pixels):
    def ln(x, key, width):
        return F.layer_norm(x, (width,), sd[key + ".weight"], sd[key + ".bias"], 1e-6)

    x = F.conv2d(pixels, sd["conv1.weight"], stride=PATCH)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = ln(x + original_get_abs_pos(sd["positional_embedding"], x.size(1)), "ln_pre", WIDTH)
    x = x.permute(1, 0, 2)
    for n in range(LAYERS):
        p = f"transformer.resblocks.{n}."
        x = x + original_visual_attention(ln(x, p + "ln_1", WIDTH), sd, p + "attn.")
        h = F.linear(ln(x, p + "ln_2", WIDTH), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        h = F.gelu(h)
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    x = x.permute(1, 0, 2)
    # Resampler.forward with a torch nn.MultiheadAttention (sequence-first).
    a = "attn_pool."
    pos_embed = original_get_abs_pos(sd[a + "pos_embed"], x.size(1))
    kv = ln(F.linear(x, sd[a + "kv_proj.weight"]), a + "ln_kv", OUT).permute(1, 0, 2)
    q = ln(sd[a + "query"], a + "ln_q", OUT)
    q = q.unsqueeze(1).repeat(1, kv.shape[1], 1) + sd[a + "pos_embed"].unsqueeze(1)
    out = F.multi_head_attention_forward(
        q, kv + pos_embed.unsqueeze(1), kv, OUT, OUT // 128, sd[a + "attn.in_proj_weight"],
        sd[a + "attn.in_proj_bias"], None, None, False, 0.0, sd[a + "attn.out_proj.weight"],
        sd[a + "attn.out_proj.bias"], training=False, need_weights=False)[0].permute(1, 0, 2)
    return ln(out, "ln_post", OUT) @ sd["proj"]


def test_tower_matches_the_original_maths(tmp_path):
    sd = write_checkpoint(tmp_path)
    tower = QwenVLTower(str(tmp_path), torch.float32)
    assert (tower.hidden_size, tower.tokens_per_tile) == (OUT, QUERIES)
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    out = tower.encode(pixels)
    assert out.shape == (2, QUERIES, OUT)
    torch.testing.assert_close(out, reference_forward(sd, pixels), atol=1e-5, rtol=1e-5)


def test_the_tower_takes_the_width_from_the_checkpoint(tmp_path):
    write_checkpoint(tmp_path)
    config = EncoderConfig(family="qwen-vl-chat", tower="torch", checkpoint=str(tmp_path),
                           image_size=IMAGE)
    assert build_tower(config).hidden_size == OUT
    with pytest.raises(ValueError, match=f"hidden_size 4096 does not match .* {OUT}"):
        build_tower(EncoderConfig(family="qwen-vl-chat", tower="torch",
                                  checkpoint=str(tmp_path), hidden_size=4096))


class NoMetadata:
    """The one part of a servicer context the handler reads."""

    def invocation_metadata(self):
        return ()


async def test_the_encoder_serves_qwen_vl_from_the_family_and_checkpoint(tmp_path):
    write_checkpoint(tmp_path, queries=256, image_size=448)
    config = EncoderConfig(family="qwen-vl-chat", tower="torch", checkpoint=str(tmp_path), port=0)
    encoder = Encoder(config, build_tower(config))
    servicer = EncoderServicer(config, encoder.preprocessor)
    servicer.encoder = encoder
    info = await servicer.GetModelInfo(encoder_pb2.EncoderInfoRequest(), NoMetadata())
    assert (info.family, info.hidden_size, info.tokens_per_tile) == ("qwen-vl-chat", OUT, 256)
    encoder.start()
    try:
        image = noise_image(300, 200)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        item = MediaItem(MediaRef(data=buffer.getvalue()))
        (result,) = [r async for rs in encoder.encode_all([item]) for r in rs]
    finally:
        await encoder.stop()
    assert (result.num_tiles, result.num_tokens, result.embeddings.shape[1]) == (1, 256, OUT)
    expected = encoder.tower.encode(reference_pixels(image).unsqueeze(0))[0]
    torch.testing.assert_close(result.embeddings, expected)


def test_a_checkpoint_without_the_sincos_table_gets_the_computed_one(tmp_path):
    sd = write_checkpoint(tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    del stored["transformer.visual.attn_pool.pos_embed"]
    save_file(stored, str(tmp_path / "model.safetensors"))
    pixels = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(4))
    out = QwenVLTower(str(tmp_path), torch.float32).encode(pixels)
    torch.testing.assert_close(out, reference_forward(sd, pixels), atol=1e-5, rtol=1e-5)
