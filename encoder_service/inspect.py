"""Shows what the encoder would do with one file, without loading a tower.

    python -m encoder_service.inspect FILE --family F [--max-tiles N] [--frames N]

FILE is an image, an audio clip (families that take audio) or a video (families that
sample videos into frames). Prints JSON: the family, the grid or slices chosen, the number
of tiles/slices/frames, the number of embedding rows the LLM will receive, the content
hash (the key of the encoder's embedding cache) and the `mm://sha256:` handle.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from encoder_service.config import FAMILIES, EncoderConfig
from encoder_service.errors import EncoderError, InvalidMedia
from encoder_service.families import Preprocessor, build_preprocessor
from encoder_service.media import decode_image
from encoder_service.video import has_video_stream, sample_frames
from mmserve.wire.media import Modality, handle_for, source_hash


def describe(path: str, family: str, max_tiles: int | None = None,
             frames: int | None = None) -> dict[str, Any]:
    """The plan for the file at `path` under `family`, as a JSON-ready dict."""
    defaults = EncoderConfig(family=family)
    config = dataclasses.replace(defaults, max_tiles=max_tiles or defaults.max_tiles,
                                 video_frames=frames or defaults.video_frames)
    preprocessor = build_preprocessor(config)
    data = Path(path).read_bytes()
    if len(data) > config.max_media_bytes:
        raise InvalidMedia(f"{path} is {len(data)} bytes; the limit is {config.max_media_bytes}")
    facts: dict[str, Any] = {"file": path}
    try:
        image = decode_image(data, config.max_image_pixels)
        media: Any = image
        facts.update(modality="image", size=[image.width, image.height])
    except InvalidMedia:
        if preprocessor.samples_video and has_video_stream(data):
            return {**facts, **_describe_video(data, preprocessor, config)}
        if Modality.AUDIO not in preprocessor.modalities:
            raise
        # Families that take audio decode it themselves (16 kHz samples for Whisper).
        media = preprocessor.decode_audio(data)
        facts.update(modality="audio")
    plan = preprocessor.plan(media, config.max_tiles)
    kind = Modality.IMAGE if facts["modality"] == "image" else Modality.AUDIO
    return {**facts, "max_tiles": config.max_tiles, **plan.to_dict(),
            "handle": handle_for(source_hash(kind, data))}


def _describe_video(data: bytes, preprocessor: Preprocessor,
                    config: EncoderConfig) -> dict[str, Any]:
    """A video becomes `video_frames` frames of one tile each, each an item with its own
    content hash (see encoder.py)."""
    picked = sample_frames(data, config.video_frames, config.max_image_pixels)
    rows = len(picked) * preprocessor.tokens_per_tile
    return {"modality": "video", "size": list(picked[0].size), "family": config.family,
            "grid": None, "num_tiles": len(picked), "num_tokens": rows,
            "content_hashes": [preprocessor.content_hash(frame, 1) for frame in picked],
            "handle": handle_for(source_hash(Modality.VIDEO, data)), "frames": len(picked)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m encoder_service.inspect",
                                     description="preprocessing plan of one media file")
    parser.add_argument("path", metavar="FILE", help="an image, audio or video file")
    parser.add_argument("--family", required=True, choices=FAMILIES)
    parser.add_argument("--max-tiles", type=int, default=None,
                        help="tiles per image (default: the encoder's default)")
    parser.add_argument("--frames", type=int, default=None,
                        help="frames sampled from a video (default: the encoder's default)")
    args = parser.parse_args(argv)
    try:
        report = describe(args.path, args.family, args.max_tiles, args.frames)
    except (OSError, ValueError, EncoderError) as exc:
        print(f"encoder_service.inspect: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
