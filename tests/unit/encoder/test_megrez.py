"""Megrez-3B-Omni: MiniCPM-V slicing, and the tower vs a reference forward written the way
vLLM's megrezo.py runs it (slices packed as [3, 14, L*14] strips, positions from tgt_sizes,
one padded batch, seq-first Resampler with a key padding mask)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from encoder_service.config import EncoderConfig
from encoder_service.towers import checkpoint_hidden_size
from encoder_service.families import build_preprocessor
from encoder_service.families.megrez import MegrezPreprocessor, slice_image
from encoder_service.towers.siglip import MegrezTower
from encoder_service.towers.whisper import WhisperAudioEncoder

from hf_layouts import make_rand, megrez_tower_state, whisper_reference_state

HIDDEN, QUERIES = 256, 64
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=980, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
AUDIO = dict(n_mels=16, n_ctx=1500, n_state=32, n_head=4, n_layer=2, output_dim=HIDDEN)


@pytest.mark.parametrize(("width", "height", "grid", "source", "slice_size", "tokens"), [
    (720, 1480, (2, 3), (308, 644), (378, 518), 448),
    (1000, 600, (2, 1), (574, 350), (406, 490), 192),
    (1920, 1080, (4, 2), (602, 336), (420, 476), 576),
    (448, 448, None, (448, 448), None, 64),
    (300, 200, None, (546, 364), None, 64),
])
def test_worked_examples(width, height, grid, source, slice_size, tokens):
    source_image, slices, got_grid = slice_image(Image.new("RGB", (width, height)))
    assert got_grid == grid and source_image.size == source
    assert [s.size for s in slices] == ([slice_size] * grid[0] * grid[1] if grid else [])
    assert MegrezPreprocessor().num_tokens(width, height) == tokens


def test_max_tiles_caps_slices():
    preprocessor = MegrezPreprocessor()
    assert preprocessor.num_tiles(1920, 1080, max_tiles=12) == 9  # never above MiniCPM-V's 9
    # Cap 4: candidates are 3 and 4 slices; 3x1 is closest to 16:9.
    assert preprocessor.num_tiles(1920, 1080, max_tiles=4) == 1 + 3
    assert preprocessor.num_tiles(1920, 1080, max_tiles=1) == 1


def test_pixels_stay_in_0_255():
    inputs = MegrezPreprocessor().preprocess(Image.new("RGB", (1000, 600), (255, 0, 10)))
    assert inputs.source.shape == (1, 3, 350, 574) and inputs.slices.shape == (2, 3, 490, 406)
    assert inputs.source[0, :, 100, 100].tolist() == [255.0, 0.0, 10.0]
    assert inputs.num_tokens == 192


def write_tiny_megrez(path, seed: int = 0) -> None:
    """A random checkpoint in the reference layout: vision.vpm.*, vision.resampler.*,
    audio.audio.* (OpenAI Whisper names); the last SigLIP layer is dropped by config."""
    state = megrez_tower_state(make_rand(seed), VISION, HIDDEN, AUDIO, QUERIES)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    config = {"hidden_size": HIDDEN, "query_num": QUERIES, "drop_vision_last_layer": True,
              "vision_config": VISION, "audio_config": AUDIO}
    (path / "config.json").write_text(json.dumps(config))


def reference_pos_embed(dim: int, size: int = 70) -> torch.Tensor:
    """MiniCPM-V get_2d_sincos_pos_embed((70, 70), version=(2, 5)): [70, 70, dim]."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("hw,d->hwd", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=-1)

    grid = np.stack(np.meshgrid(np.arange(size, dtype=np.float32),
                                np.arange(size, dtype=np.float32)), axis=0)  # w first
    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=-1)
    return torch.from_numpy(emb).float()


def reference_forward(tower: MegrezTower, images: list[torch.Tensor]) -> torch.Tensor:
    """All slices of one image in one padded, packed batch, as megrezo.py runs them."""
    vpm, res = tower.vision.vpm, tower.vision.resampler
    tgt = [(img.shape[1] // 14, img.shape[2] // 14) for img in images]
    lengths = [h * w for h, w in tgt]
    max_len, batch = max(lengths), len(images)
    packed = torch.zeros(batch, 3, 14, max_len * 14)
    for b, img in enumerate(images):  # MiniCPM-V reshape_by_patch
        patches = torch.nn.functional.unfold(img[None], (14, 14), stride=(14, 14))
        patches = patches.reshape(3, 14, 14, -1).permute(0, 1, 3, 2).reshape(3, 14, -1)
        packed[b, :, :, :patches.shape[-1]] = patches
    x = vpm.embeddings.patch_embedding((packed - 127.5) / 127.5).flatten(2).transpose(1, 2)
    n = vpm.embeddings.num_patches_per_side
    boundaries = torch.arange(1 / n, 1.0, 1 / n)
    position_ids = torch.zeros(batch, max_len, dtype=torch.long)
    for b, (h, w) in enumerate(tgt):  # vLLM Idefics2VisionEmbeddings with tgt_sizes
        bh = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / h), boundaries, right=True)
        bw = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / w), boundaries, right=True)
        position_ids[b, :h * w] = (bh[:, None] * n + bw).flatten()
    x = x + vpm.embeddings.position_embedding(position_ids)
    valid = torch.arange(max_len)[None] < torch.tensor(lengths)[:, None]
    mask = torch.zeros(batch, 1, max_len, max_len).masked_fill(~valid[:, None, None], -1e9)
    x = vpm.post_layernorm(vpm.encoder(inputs_embeds=x, attention_mask=mask).last_hidden_state)
    pos = reference_pos_embed(HIDDEN)
    pos = torch.nn.utils.rnn.pad_sequence([pos[:h, :w].reshape(h * w, -1) for h, w in tgt],
                                          batch_first=True).permute(1, 0, 2)
    kv = res.ln_kv(res.kv_proj(x)).permute(1, 0, 2)
    attn = torch.nn.MultiheadAttention(HIDDEN, HIDDEN // 128)
    attn.load_state_dict(res.attn.state_dict())
    q = res.ln_q(res.query).unsqueeze(1).repeat(1, batch, 1)
    out = attn(q, kv + pos, kv, key_padding_mask=~valid)[0].permute(1, 0, 2)
    return (res.ln_post(out) @ res.proj).flatten(0, 1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("megrez")
    write_tiny_megrez(path)
    return path


def test_tower_matches_reference(checkpoint):
    config = EncoderConfig(port=0, family="megrez-omni", tower="torch", checkpoint=str(checkpoint))
    assert checkpoint_hidden_size(config.family, str(checkpoint)) == HIDDEN
    tower = MegrezTower(checkpoint, torch.float32)
    assert len(tower.vision.vpm.encoder.layers) == 2
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 600, 3), np.uint8))
    inputs = build_preprocessor(config).preprocess(image, max_tiles=9)
    assert inputs.num_tiles == 3 and inputs.source.shape[2:] != inputs.slices.shape[2:]
    rows = tower.encode_item(inputs)
    assert rows.shape == (3 * QUERIES, HIDDEN)
    with torch.no_grad():
        expected = reference_forward(tower, [inputs.source[0], *inputs.slices])
    torch.testing.assert_close(rows, expected, rtol=1e-4, atol=1e-4)


def test_audio_goes_through_the_whisper_tower(checkpoint):
    tower = MegrezTower(checkpoint, torch.float32)
    preprocessor = MegrezPreprocessor(n_mels=16)
    samples = np.sin(np.arange(16000) * 0.05).astype(np.float32) * 0.3
    rows = tower.encode_item(preprocessor.preprocess(samples))
    standalone = WhisperAudioEncoder.from_config(AUDIO)
    state = whisper_reference_state(make_rand(0), **AUDIO)
    loaded = {k.removeprefix("audio.audio."): v for k, v in
              load_file(str(checkpoint / "model.safetensors")).items()
              if k.startswith("audio.audio.")}
    assert loaded.keys() == state.keys()
    standalone.load_reference_state(loaded)
    with torch.no_grad():
        expected = standalone.eval()(preprocessor.preprocess(samples))
    assert rows.shape == (27, HIDDEN)
    torch.testing.assert_close(rows, expected)
    torch.testing.assert_close(rows[0], loaded["audio_bos_eos_token.weight"][0])
