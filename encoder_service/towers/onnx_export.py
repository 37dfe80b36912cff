"""Exports a vision tower (+ projector) to ONNX with a dynamic tile dimension.

The ONNX file is the input of the TensorRT build (encoder_service.towers.tensorrt or
trtexec), which builds a strongly typed network: the precision is the ONNX graph's own, so
a bf16/fp16 engine is built from an export in that dtype (`--dtype`): float32 pixel values
in, cast to the dtype, every weight and operation in it, rows out in it. The float32 export
is checked against the torch tower with onnxruntime on CPU; the typed one has the same graph
with other types (onnxruntime's CPU provider does not run bf16), and `typed_graph_dtypes`
reads those types back.

    python -m encoder_service.towers.onnx_export --out vision.onnx --set hidden_size=896
    python -m encoder_service.towers.onnx_export --out vision.onnx --dtype bfloat16 ...
        # also writes vision.bfloat16.onnx, the input of the bf16 build
"""

from __future__ import annotations

import argparse
import copy
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


EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TypedTower(nn.Module):
    """The tower computing in `dtype`: float32 pixel values are cast on the way in."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module.to(dtype)
        self.dtype = dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.module(pixel_values.to(self.dtype))


def export_onnx(module: nn.Module, path: Path, image_size: int = 448, opset: int = 17,
                example_tiles: int = 2, dtype: str = "float32") -> Path:
    """Writes `module` as ONNX with input `pixel_values` [tiles, 3, S, S] float32 (tiles
    dynamic), computing and returning rows in `dtype`."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    module = module.float().eval()
    if dtype != "float32":
        module = TypedTower(copy.deepcopy(module), EXPORT_DTYPES[dtype]).eval()
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


def typed_graph_dtypes(path: Path) -> dict[str, str]:
    """The element types of an export: its input, its output, and the set of its weights'."""
    import onnx

    model = onnx.load(str(path))
    name = onnx.TensorProto.DataType.Name
    floats = {name(t.data_type).lower() for t in model.graph.initializer
              if name(t.data_type) in ("FLOAT", "FLOAT16", "BFLOAT16")}
    return {"input": name(model.graph.input[0].type.tensor_type.elem_type).lower(),
            "output": name(model.graph.output[0].type.tensor_type.elem_type).lower(),
            "weights": ",".join(sorted(floats))}


def typed_path(path: Path, dtype: str) -> Path:
    """Where the export in `dtype` goes beside the float32 one (vision.bfloat16.onnx)."""
    return path.with_name(f"{path.stem}.{dtype}{path.suffix}")


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
    parser.add_argument("--dtype", default="float32", choices=sorted(EXPORT_DTYPES),
                        help="also export the tower computing in this dtype (the input of "
                             "a strongly typed TensorRT build) beside --out")
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
        if args.dtype != "float32":
            typed = export_onnx(module, typed_path(args.out, args.dtype), config.image_size,
                                args.opset, dtype=args.dtype)
            log.info("%s: %s", typed, typed_graph_dtypes(typed))
    except (ValueError, TypeError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
