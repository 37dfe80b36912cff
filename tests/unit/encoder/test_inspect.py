"""`python -m encoder_service.inspect`: the plan printed for every registered family."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stdout

import pytest
from PIL import Image

from encoder_service.config import FAMILIES, EncoderConfig
from encoder_service.families import build_preprocessor
from encoder_service.inspect import describe, main
from mmserve.wire.media import MediaItem, MediaRef, Modality

from .test_video import make_video


@pytest.fixture
def image_1000x600(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (1000, 600), (10, 200, 30)).save(path)
    return str(path)


def run(argv: list[str]) -> tuple[int, dict | None]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(argv)
    return code, json.loads(out.getvalue()) if code == 0 else None


def test_internvl2_plan_is_the_worked_example(image_1000x600):
    code, report = run([image_1000x600, "--family", "internvl2"])
    assert code == 0
    assert (report["grid"], report["num_tiles"], report["num_tokens"]) == ([3, 2], 7, 1792)
    assert report["size"] == [1000, 600] and report["thumbnail"] is True
    image = Image.open(image_1000x600).convert("RGB")
    assert report["content_hash"] == build_preprocessor(EncoderConfig()).content_hash(image, 12)


def test_max_tiles_changes_the_grid(image_1000x600):
    code, report = run([image_1000x600, "--family", "internvl2", "--max-tiles", "1"])
    assert code == 0
    assert (report["grid"], report["num_tiles"], report["num_tokens"]) == ([1, 1], 1, 256)
    assert report["thumbnail"] is False


def test_qwen_vl_is_always_one_tile_of_256(image_1000x600):
    code, report = run([image_1000x600, "--family", "qwen-vl-chat", "--max-tiles", "6"])
    assert code == 0
    assert (report["num_tiles"], report["num_tokens"]) == (1, 256)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_registered_family_describes_an_image(image_1000x600, family):
    report = describe(image_1000x600, family)
    assert report["family"] == family and report["modality"] == "image"
    assert report["num_tiles"] >= 1 and report["num_tokens"] >= report["num_tiles"]
    assert len(report["content_hash"]) == 64


async def test_a_video_is_planned_as_the_encoder_encodes_it(tmp_path, encoder):
    data = make_video(20)
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    code, report = run([str(path), "--family", "internvl2", "--frames", "3"])
    assert code == 0
    assert (report["modality"], report["frames"], report["num_tiles"], report["num_tokens"]) == (
        "video", 3, 3, 768)
    encoded = await encoder.encode(MediaItem(MediaRef(data=data), Modality.VIDEO, num_frames=3))
    assert (report["content_hashes"], report["num_tokens"]) == (
        [frame.content_hash for frame in encoded], sum(frame.num_tokens for frame in encoded))
    assert {frame.handle for frame in encoded} == {report["handle"]}
    code, default = run([str(path), "--family", "internvl2"])
    assert default["frames"] == encoder.config.video_frames


def test_unreadable_input_is_an_error_not_a_traceback(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert main([str(path), "--family", "internvl2"]) == 1
    assert "not a supported image" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.png"), "--family", "internvl2"]) == 1


def test_runs_as_a_module(image_1000x600):
    result = subprocess.run([sys.executable, "-m", "encoder_service.inspect", image_1000x600,
                             "--family", "internvl2", "--max-tiles", "2"],
                            capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(result.stdout)["grid"] == [2, 1]
