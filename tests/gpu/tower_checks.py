"""The tower part of the GPU check: each encoder tower on the device against CPU fp32.

The towers compute in bfloat16 on CUDA (float32 on the CPU), so agreement is judged by the
cosine of the flattened rows and the largest difference relative to the largest CPU value.
Checkpoints come from tests/e2e/family_checkpoints.py (tiny, random, each family's layout).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MIN_COSINE, MAX_RELATIVE = 0.999, 0.05


def _stand_in_for_av() -> bool:
    """encoder_service.families.audio imports PyAV for decoding, which no check here uses; on a host
    without it a placeholder module stands in (and using it would raise)."""
    if importlib.util.find_spec("av") is not None:
        return False

    def missing(*args, **kwargs):
        raise RuntimeError("PyAV is not installed on this host")

    sys.modules["av"] = types.SimpleNamespace(open=missing, __name__="av")
    return True


def image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    return Image.fromarray(pixels)


def _cases(work: Path):
    """(name, family, checkpoint or None for the demo tower, media, max_tiles)."""
    from family_checkpoints import BUILDERS

    tone = (np.sin(np.arange(16000 * 3) * 0.05) * 0.3).astype(np.float32)
    yield "tower-demo", "internvl2", None, image(900, 600, 0), 6
    for family, media, tiles in (("internvl2", image(1000, 600, 1), 6),
                                 ("qwen-vl-chat", image(640, 480, 2), 1),
                                 ("llava-1.6", image(1000, 600, 3), 5),
                                 ("megrez-omni", image(720, 1480, 4), 9)):
        checkpoint = BUILDERS[family](work / family)
        yield f"tower-{family}", family, checkpoint, media, tiles
        if family == "megrez-omni":
            yield "tower-megrez-omni-audio", family, checkpoint, tone, 0


def _encode(family: str, checkpoint: Path | None, device: str, media, max_tiles: int):
    from encoder_service.config import EncoderConfig
    from encoder_service.families import build_preprocessor
    from encoder_service.towers import build_tower

    if checkpoint is None:
        config = EncoderConfig(tower="demo", hidden_size=64, device=device, dtype="float32")
    else:
        config = EncoderConfig(family=family, tower="torch", checkpoint=str(checkpoint),
                               device=device, dtype="float32")
    tower = build_tower(config)
    prepared = build_preprocessor(config).preprocess(media, max_tiles)
    with torch.inference_mode():
        rows = tower.encode_item(prepared)  # every tower takes one whole item
    return rows.float().cpu(), getattr(tower, "compute_dtype", torch.float32)


def check_towers(report, device: str, work: Path) -> None:
    if _stand_in_for_av():
        report.line("INFO", "tower-env", "PyAV is not installed: a placeholder stands in "
                    "(no media decoding is checked here)")
    for name, family, checkpoint, media, tiles in _cases(work):
        try:
            expected, _ = _encode(family, checkpoint, "cpu", media, tiles)
            got, compute = _encode(family, checkpoint, device, media, tiles)
        except Exception as exc:  # one tower failing must not hide the others
            report.line("FAIL", name, f"{type(exc).__name__}: {exc}")
            continue
        if got.shape != expected.shape:
            report.line("FAIL", name, f"rows {list(got.shape)} on {device}, "
                        f"{list(expected.shape)} on the CPU")
            continue
        cosine = float(torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(),
                                                             dim=0))
        relative = float((got - expected).abs().max() / expected.abs().max())
        report.check(cosine >= MIN_COSINE and relative <= MAX_RELATIVE, name,
                     f"rows {list(got.shape)}, {device} {str(compute).removeprefix('torch.')} "
                     f"vs cpu float32: cosine {cosine:.5f} (>= {MIN_COSINE}), max diff "
                     f"{relative:.2e} of the largest value (<= {MAX_RELATIVE})")
