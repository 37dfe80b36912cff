"""Exports a vision tower (+ projector) to ONNX with a dynamic tile dimension.

The ONNX file is the input of the TensorRT build (encoder_service.towers.tensorrt or
trtexec). It is exported in float32; the TensorRT build picks the precision. The export
is checked against the torch tower with onnxruntime on CPU.

    python -m encoder_service.towers.onnx_export --out vision.onnx --set hidden_size=896
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from encoder_service.config import EncoderConfig
from encoder_service.towers import build_tower
from encoder_service.towers.base import INPUT_NAME, OUTPUT_NAME, Tower

log = logging.getLogger(__name__)



def tower_module(tower: Tower) -> nn.Module:
    """The tower's nn.Module: pixel values [N, 3, S, S] -> [N, tokens_per_tile, hidden].

    """
    module = getattr(tower, "module", None)  # declared by Tower; tolerant of other objects
    if not isinstance(module, nn.Module):
        raise ValueError(f"{type(tower).__name__} exposes no torch module to export")
    return module


def export_onnx(module: nn.Module, path: Path, image_size: int = 448, opset: int = 17,
                example_tiles: int = 2) -> Path:
    """Writes `module` as ONNX with input `pixel_values` [tiles, 3, S, S] (tiles dynamic)."""
    module = module.float().eval()
    example = torch.randn(example_tiles, 3, image_size, image_size, device=_device(module))
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # nn.MultiheadAttention's inference fast path is one fused op ONNX has no symbolic for.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Shapes other than the tile count are constants by design; check_onnx proves
            # the exported graph on a tile count different from the example's.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module, (example,), str(path), input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "tiles"}, OUTPUT_NAME: {0: "tiles"}},
                opset_version=opset, dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    log.info("exported %s (%.1f MB) in %.1f s", path, path.stat().st_size / 2**20,
             time.monotonic() - started)
    return path


def check_onnx(module: nn.Module, path: Path, tiles: int, image_size: int = 448,
               atol: float = 1e-3, seed: int = 0) -> float:
    """Runs the ONNX file with onnxruntime (CPU) and the module on the same tiles.

    Returns the max absolute difference; raises ValueError when it exceeds `atol`.
    """
    import onnxruntime

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(tiles, 3, image_size, image_size, generator=generator)
    with torch.no_grad():
        expected = module.float().eval()(pixels.to(_device(module))).cpu()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})
    diff = float((torch.from_numpy(got) - expected).abs().max())
    if tuple(got.shape) != tuple(expected.shape) or diff > atol:
        raise ValueError(f"ONNX output {list(got.shape)} differs from the torch tower "
                         f"{list(expected.shape)} by {diff:.2e} (tolerance {atol:.0e})")
    return diff


def _device(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _parse_sets(pairs: list[str]) -> dict:
    values = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        values[key] = int(raw) if raw.lstrip("-").isdigit() else raw
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="encoder config field (tower, hidden_size, image_size, ...)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--check-tiles", type=int, default=3,
                        help="tiles for the onnxruntime check; 0 skips it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        config = EncoderConfig(**_parse_sets(args.set))
        log.info("loading tower %r", config.tower)
        module = tower_module(build_tower(config))
        export_onnx(module, args.out, config.image_size, args.opset)
        if args.check_tiles:
            diff = check_onnx(module, args.out, args.check_tiles, config.image_size)
            log.info("onnxruntime matches the torch tower (max abs diff %.2e)", diff)
    except (ValueError, TypeError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
