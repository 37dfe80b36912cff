"""InternViTTower against a reference forward written from InternVL's original modeling code.

The checkpoints are tiny and random, saved in the original InternVL2 key layout
(`vision_model.*`, `mlp1.*`, fused qkv, ls1/ls2); the reference below follows
`modeling_intern_vit.py` (InternVisionEmbeddings, InternAttention._naive_attn,
InternVisionEncoderLayer) and `modeling_internvl_chat.py` (extract_feature,
pixel_shuffle v2, mlp1) op by op.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from encoder_service.config import EncoderConfig
from encoder_service.encoder import Encoder
from encoder_service.families import build_preprocessor
from encoder_service.families.internvl import IMAGENET_MEAN, IMAGENET_STD
from encoder_service.towers import build_tower
from hf_layouts import internvit_state, make_rand
from encoder_service.towers.internvit import InternViTTower
from mmserve.wire.media import MediaItem, MediaRef

IMAGE, PATCH, LLM = 56, 14, 24

VIT_300M = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
                qkv_bias=True, qk_normalization=False, norm_type="layer_norm", layer_norm_eps=1e-6)
VIT_6B = dict(hidden_size=40, num_attention_heads=5, intermediate_size=72, num_hidden_layers=3,
              qkv_bias=False, qk_normalization=True, norm_type="rms_norm", layer_norm_eps=1e-6)


def write_checkpoint(path, vision: dict, select_layer: int = -1, seed: int = 0) -> dict:
    """Random weights in the original layout; returns the state dict."""
    sd = internvit_state(make_rand(seed, 0.2), vision, IMAGE, PATCH, LLM)
    sd["language_model.model.embed_tokens.weight"] = make_rand(seed + 1, 0.2)(10, LLM)
    # Two shards, as real checkpoints come, to exercise loading across files.
    keys = sorted(sd)
    for shard, part in ((1, keys[::2]), (2, keys[1::2])):
        save_file({k: sd[k].contiguous() for k in part},
                  str(path / f"model-0000{shard}-of-00002.safetensors"))
    config = {"architectures": ["InternVLChatModel"], "downsample_ratio": 0.5, "ps_version": "v2",
              "select_layer": select_layer, "force_image_size": IMAGE, "max_dynamic_patch": 12,
              "torch_dtype": "bfloat16", "llm_config": {"hidden_size": LLM},
              "vision_config": {**vision, "image_size": IMAGE, "patch_size": PATCH,
                                "hidden_act": "gelu"}}
    (path / "config.json").write_text(json.dumps(config))
    return sd


def _norm(x, sd, key, vision):
    if vision["norm_type"] == "layer_norm":
        return F.layer_norm(x, (x.shape[-1],), sd[key + ".weight"], sd[key + ".bias"],
                            vision["layer_norm_eps"])
    return _rms(x, sd[key + ".weight"], vision["layer_norm_eps"])


def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _attention(x, sd, p, vision):
    b, n, c = x.shape
    heads = vision["num_attention_heads"]
    qkv = F.linear(x, sd[p + "attn.qkv.weight"], sd.get(p + "attn.qkv.bias"))
    q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    if vision["qk_normalization"]:
        bh, hh, nh, dh = q.shape
        eps = vision["layer_norm_eps"]
        q = _rms(q.transpose(1, 2).flatten(-2, -1), sd[p + "attn.q_norm.weight"], eps)
        q = q.view(bh, nh, hh, dh).transpose(1, 2)
        k = _rms(k.transpose(1, 2).flatten(-2, -1), sd[p + "attn.k_norm.weight"], eps)
        k = k.view(bh, nh, hh, dh).transpose(1, 2)
    attn = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(b, n, c)
    return F.linear(x, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])


def reference_forward(sd, vision, pixel_values, select_layer=-1):
    e = "vision_model.embeddings."
    x = F.conv2d(pixel_values, sd[e + "patch_embedding.weight"], sd[e + "patch_embedding.bias"],
                 stride=PATCH)
    b, c, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[e + "class_embedding"].expand(b, 1, -1), x], dim=1)
    pos = sd[e + "position_embedding"]
    grid = pos[:, 1:].reshape(1, IMAGE // PATCH, IMAGE // PATCH, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    x = x + torch.cat([pos[:, :1], grid.reshape(1, -1, h * w).permute(0, 2, 1)], dim=1)
    hidden_states = [x]
    for n in range(vision["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{n}."
        x = x + _attention(_norm(x, sd, p + "norm1", vision), sd, p, vision) * sd[p + "ls1"]
        y = F.gelu(F.linear(_norm(x, sd, p + "norm2", vision), sd[p + "mlp.fc1.weight"],
                            sd[p + "mlp.fc1.bias"]))
        x = x + F.linear(y, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"]) * sd[p + "ls2"]
        hidden_states.append(x)
    x = hidden_states[select_layer][:, 1:, :]
    side = int(math.sqrt(x.shape[1]))
    x = x.reshape(b, side, side, -1)
    # pixel_shuffle(x, 0.5), ps_version v2
    n, w, h, c = x.size()
    x = x.view(n, w, h // 2, c * 2).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, h // 2, w // 2, c * 4).permute(0, 2, 1, 3).contiguous()
    x = x.reshape(b, -1, x.shape[-1])
    x = F.layer_norm(x, (x.shape[-1],), sd["mlp1.0.weight"], sd["mlp1.0.bias"], 1e-5)
    x = F.gelu(F.linear(x, sd["mlp1.1.weight"], sd["mlp1.1.bias"]))
    return F.linear(x, sd["mlp1.3.weight"], sd["mlp1.3.bias"])


@pytest.mark.parametrize("vision,select_layer", [(VIT_300M, -1), (VIT_6B, -1), (VIT_300M, -2)],
                         ids=["300m", "6b", "300m-select-2"])
def test_tower_matches_the_original_maths(tmp_path, vision, select_layer):
    sd = write_checkpoint(tmp_path, vision, select_layer)
    tower = InternViTTower(str(tmp_path), torch.float32)
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    out = tower.encode(pixels)
    assert out.shape == (3, 4, LLM) and tower.tokens_per_tile == 4
    expected = reference_forward(sd, vision, pixels, select_layer)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_output_dtype_follows_the_service_config(tmp_path):
    write_checkpoint(tmp_path, VIT_300M)
    tower = InternViTTower(str(tmp_path), torch.bfloat16)
    assert tower.encode(torch.zeros(1, 3, IMAGE, IMAGE)).dtype == torch.bfloat16


async def test_the_encoder_tiles_and_encodes_with_the_checkpoint_tower(tmp_path):
    write_checkpoint(tmp_path, VIT_300M)
    config = EncoderConfig(tower="torch", checkpoint=str(tmp_path), image_size=IMAGE, port=0)
    assert config.hidden_size is None  # config holds values only: the width is the checkpoint's
    tower = build_tower(config)
    assert isinstance(tower, InternViTTower) and tower.hidden_size == LLM
    encoder = Encoder(config, tower)
    encoder.start()
    try:
        buffer = io.BytesIO()
        Image.new("RGB", (120, 56), (90, 20, 200)).save(buffer, format="PNG")
        item = MediaItem(MediaRef(data=buffer.getvalue()))
        (result,) = [r async for rs in encoder.encode_all([item]) for r in rs]
    finally:
        await encoder.stop()
    # 120x56 -> 2x1 grid + thumbnail = 3 tiles of 4 rows each.
    assert (result.num_tiles, result.num_tokens, result.embeddings.shape[1]) == (3, 12, LLM)


def test_a_hidden_size_that_differs_from_the_checkpoint_fails_fast(tmp_path):
    write_checkpoint(tmp_path, VIT_300M)
    for shard in tmp_path.glob("*.safetensors"):
        shard.unlink()  # fails before any weight is read
    with pytest.raises(ValueError, match=f"hidden_size 896 does not match the checkpoint's "
                                         f"LLM hidden size {LLM}"):
        build_tower(EncoderConfig(tower="torch", checkpoint=str(tmp_path), hidden_size=896))


def test_a_tile_size_other_than_the_checkpoints_fails_at_load(tmp_path):
    write_checkpoint(tmp_path, VIT_300M)
    with pytest.raises(ValueError, match="image_size 448 != the checkpoint's tile size 56"):
        build_tower(EncoderConfig(tower="torch", checkpoint=str(tmp_path)))


def test_torch_tower_without_a_checkpoint_is_refused():
    with pytest.raises(ValueError, match="tower torch needs checkpoint"):
        EncoderConfig(tower="torch")


def test_missing_tensor_is_named(tmp_path):
    sd = write_checkpoint(tmp_path, VIT_300M)
    del sd["vision_model.encoder.layers.1.ls2"]
    for shard in tmp_path.glob("*.safetensors"):
        shard.unlink()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="encoder.layers.1.ls2"):
        InternViTTower(str(tmp_path), torch.float32)


def reference_tiles(image: Image.Image, max_num: int, image_size: int = 448) -> torch.Tensor:
    """load_image + dynamic_preprocess + build_transform, transcribed from InternVL."""
    image = image.convert("RGB")
    width, height = image.size
    aspect_ratio = width / height
    ratios = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1)
                     for j in range(1, n + 1) if 1 <= i * j <= max_num}, key=lambda x: x[0] * x[1])
    best_diff, best = float("inf"), (1, 1)
    for ratio in ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif (diff == best_diff
              and width * height > 0.5 * image_size * image_size * ratio[0] * ratio[1]):
            best = ratio
    resized = image.resize((image_size * best[0], image_size * best[1]))
    tiles = []
    for i in range(best[0] * best[1]):
        box = ((i % best[0]) * image_size, (i // best[0]) * image_size,
               ((i % best[0]) + 1) * image_size, ((i // best[0]) + 1) * image_size)
        tiles.append(resized.crop(box))
    if len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    mean, std = torch.as_tensor(IMAGENET_MEAN), torch.as_tensor(IMAGENET_STD)
    out = []
    for tile in tiles:
        tile = tile.resize((image_size, image_size), Image.BICUBIC)  # T.Resize: a no-op here
        tensor = torch.from_numpy(np.array(tile, np.uint8, copy=True)).permute(2, 0, 1)
        tensor = tensor.contiguous().to(torch.float32).div(255)
        out.append(tensor.sub_(mean[:, None, None]).div_(std[:, None, None]))
    return torch.stack(out)


@pytest.mark.parametrize("size,mode,max_num", [((1000, 600), "RGB", 12), ((300, 200), "RGB", 12),
                                               ((500, 500), "RGB", 12), ((700, 450), "L", 6),
                                               ((333, 777), "RGBA", 4), ((640, 360), "RGB", 1)])
def test_pixels_are_bit_equal_to_the_reference_transform(size, mode, max_num):
    rng = np.random.default_rng(sum(size))
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(array).convert(mode)
    prepared = build_preprocessor(EncoderConfig()).preprocess(image, max_num)
    expected = reference_tiles(image, max_num)
    assert prepared.num_tiles == expected.shape[0]
    assert prepared.num_tokens == 256 * prepared.num_tiles
    assert torch.equal(prepared.pixel_values, expected)
