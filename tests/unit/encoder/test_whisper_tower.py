"""The Whisper audio tower vs a reference forward written the way Megrez's AudioEncoder is."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import WhisperFeatureExtractor

from encoder_service.families.audio import AudioPreprocessor, audio_lengths
from encoder_service.towers.whisper import WhisperAudioEncoder
from hf_layouts import make_rand, whisper_reference_state

N_MELS, N_CTX, N_STATE, N_HEAD, N_LAYER, OUTPUT_DIM = 16, 1500, 32, 4, 2, 48


def random_reference_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """OpenAI-Whisper-named tensors, as Megrez checkpoints store them under `audio.audio.`."""
    return whisper_reference_state(make_rand(seed, 0.2), N_MELS, N_CTX, N_STATE, N_LAYER,
                                   OUTPUT_DIM)


def reference_forward(s: dict[str, torch.Tensor], mel: torch.Tensor, samples: int) -> torch.Tensor:
    """Megrez AudioEncoder.encode for one item: full 3000-frame mel in, span rows out."""
    after_cnn = audio_lengths(samples).after_cnn
    span = audio_lengths(samples).span
    x = mel[None, :, :after_cnn * 2]
    x = F.gelu(F.conv1d(x, s["conv1.weight"], s["conv1.bias"], padding=1))
    x = F.gelu(F.conv1d(x, s["conv2.weight"], s["conv2.bias"], stride=2, padding=1))
    x = x.permute(0, 2, 1)
    inc = np.log(10000) / (N_STATE // 2 - 1)
    inv = torch.exp(-inc * torch.arange(N_STATE // 2))
    t = torch.arange(N_CTX)[:, None] * inv[None, :]
    x = x + torch.cat([torch.sin(t), torch.cos(t)], dim=1)[:x.shape[1]]
    for i in range(N_LAYER):
        p = f"blocks.{i}."

        def ln(v, name):
            return F.layer_norm(v, (N_STATE,), s[p + name + ".weight"], s[p + name + ".bias"])

        h = ln(x, "attn_ln")
        q = F.linear(h, s[p + "attn.query.weight"], s[p + "attn.query.bias"])
        k = F.linear(h, s[p + "attn.key.weight"])
        v = F.linear(h, s[p + "attn.value.weight"], s[p + "attn.value.bias"])
        scale = (N_STATE // N_HEAD) ** -0.25
        q = q.view(1, -1, N_HEAD, N_STATE // N_HEAD).permute(0, 2, 1, 3) * scale
        k = k.view(1, -1, N_HEAD, N_STATE // N_HEAD).permute(0, 2, 3, 1) * scale
        v = v.view(1, -1, N_HEAD, N_STATE // N_HEAD).permute(0, 2, 1, 3)
        w = F.softmax(q @ k, dim=-1)
        a = (w @ v).permute(0, 2, 1, 3).flatten(2)
        x = x + F.linear(a, s[p + "attn.out.weight"], s[p + "attn.out.bias"])
        h = F.gelu(F.linear(ln(x, "mlp_ln"), s[p + "mlp.0.weight"], s[p + "mlp.0.bias"]))
        x = x + F.linear(h, s[p + "mlp.2.weight"], s[p + "mlp.2.bias"])
    x = F.avg_pool1d(x.permute(0, 2, 1), 2, 2).permute(0, 2, 1)
    x = F.layer_norm(x, (N_STATE,), s["ln_post.weight"], s["ln_post.bias"])
    x = F.linear(x, s["proj.weight"], s["proj.bias"])
    bos, eos = s["audio_bos_eos_token.weight"]
    return torch.cat([bos[None], x[0][:span - 2], eos[None]])


@pytest.fixture(scope="module")
def encoder() -> WhisperAudioEncoder:
    module = WhisperAudioEncoder.from_config(dict(n_mels=N_MELS, n_ctx=N_CTX, n_state=N_STATE,
                                                  n_head=N_HEAD, n_layer=N_LAYER,
                                                  output_dim=OUTPUT_DIM))
    module.load_reference_state(random_reference_state())
    return module.eval()


@pytest.mark.parametrize(("seconds", "span"), [(1.0, 27), (2.5, 64), (0.37, 11)])
def test_matches_reference_forward(encoder, seconds, span):
    samples = int(seconds * 16000)
    rng = np.random.default_rng(1)
    audio = (0.3 * np.sin(np.arange(samples) * 2 * math.pi * 440 / 16000)
             + 0.05 * rng.standard_normal(samples)).astype(np.float32)
    preprocessor = AudioPreprocessor(n_mels=N_MELS)
    features = preprocessor.features(audio)
    extractor = WhisperFeatureExtractor(feature_size=N_MELS)
    full_mel = torch.from_numpy(
        extractor(audio, sampling_rate=16000, return_tensors="np")["input_features"][0])
    assert full_mel.shape == (N_MELS, 3000)
    with torch.no_grad():
        rows = encoder(features)
        expected = reference_forward(random_reference_state(), full_mel.float(), samples)
    assert rows.shape == (span, OUTPUT_DIM)
    torch.testing.assert_close(rows, expected, rtol=1e-4, atol=1e-4)


def test_missing_tensor_is_an_error():
    module = WhisperAudioEncoder(N_MELS, N_CTX, N_STATE, N_HEAD, N_LAYER, OUTPUT_DIM)
    state = random_reference_state()
    del state["blocks.1.mlp.2.weight"]
    with pytest.raises(RuntimeError, match="layers.1.fc2.weight"):
        module.load_reference_state(state)
