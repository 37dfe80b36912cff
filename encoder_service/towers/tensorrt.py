"""The vision tower as a TensorRT engine: build it from the ONNX export, run it on CUDA.

The network is strongly typed (TensorRT 10): every tensor has the type the ONNX graph gives
it, so the engine's precision is the export's (`onnx_export --dtype bfloat16` writes the bf16
graph). The FP16/BF16 builder flags of weakly typed builds are deprecated since TensorRT
10.12 and gone in 11, and TensorRT refuses them on a strongly typed network.

The engine has one dynamic dimension, the number of tiles, with an optimization profile
min/opt/max (InternVL2: 1 / 13 / 26 = one or two images of up to 12 tiles + thumbnail).
It runs on the caller's current CUDA stream, so its inputs and outputs are ordered with the
caller's own work without a synchronization of its own.

    python -m encoder_service.towers.tensorrt vision.bfloat16.onnx vision.plan \\
        --min-tiles 1 --opt-tiles 13 --max-tiles 26
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from encoder_service.towers.base import INPUT_NAME, OUTPUT_NAME, Tower, check_tiles

log = logging.getLogger(__name__)


def _trt():
    try:
        import tensorrt
    except ImportError as exc:
        raise ValueError("the TensorRT tower needs the tensorrt package (TensorRT >= 10); "
                         f"use the GPU image (deploy/docker/Dockerfile.gpu) ({exc})") from None
    return tensorrt


def network_flags(trt) -> int:
    """create_network flags: strongly typed (explicit batch is the only mode since 10.0)."""
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def build_engine(onnx_path: Path, engine_path: Path, min_tiles: int = 1, opt_tiles: int = 13,
                 max_tiles: int = 26, image_size: int = 448, workspace_gib: float = 8.0) -> Path:
    """Parses the ONNX file and writes a serialized, strongly typed engine with a dynamic
    tile profile; its precision is the ONNX graph's."""
    if not 1 <= min_tiles <= opt_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= opt_tiles <= max_tiles, got "
                         f"{min_tiles}/{opt_tiles}/{max_tiles}")
    trt = _trt()
    logger = trt.Logger(trt.Logger.INFO)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    profile = builder.create_optimization_profile()
    tile = (3, image_size, image_size)
    profile.set_shape(INPUT_NAME, (min_tiles, *tile), (opt_tiles, *tile), (max_tiles, *tile))
    config.add_optimization_profile(profile)
    log.info("building the strongly typed TensorRT engine (tiles %d/%d/%d); this takes minutes",
             min_tiles, opt_tiles, max_tiles)
    started = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ValueError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    log.info("wrote %s (%.1f MB) in %.0f s", engine_path, engine_path.stat().st_size / 2**20,
             time.monotonic() - started)
    return engine_path


class TensorRTTower(Tower):
    """Runs a serialized vision engine; same contract as the torch towers (rows on the CPU)."""

    def __init__(self, engine_path: Path, dtype: torch.dtype, image_size: int = 448,
                 device: str = "cuda") -> None:
        trt = _trt()
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self._engine is None:
            raise ValueError(f"{engine_path} is not a TensorRT engine for this TensorRT "
                             "version and GPU")
        self._context = self._engine.create_execution_context()
        self._device = torch.device(device)
        self.image_size = image_size
        self.dtype = dtype
        out_shape = self._engine.get_tensor_shape(OUTPUT_NAME)  # [-1, tokens, hidden]
        self.tokens_per_tile, self.hidden_size = int(out_shape[1]), int(out_shape[2])
        self._in_dtype = _torch_dtype(trt, self._engine.get_tensor_dtype(INPUT_NAME))
        self._out_dtype = _torch_dtype(trt, self._engine.get_tensor_dtype(OUTPUT_NAME))
        _, _, max_shape = self._engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self.max_tiles = int(max_shape[0])

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        check_tiles(pixel_values, self.image_size)
        # Every copy, the engine and the output allocation are queued on the current
        # stream: the caching allocator then never hands a tensor still in use by the
        # engine to other work, and the copy to the CPU waits for the engine.
        stream = torch.cuda.current_stream(self._device)
        chunks = [self._run(chunk, stream) for chunk in pixel_values.split(self.max_tiles)]
        return torch.cat(chunks).to("cpu", self.dtype)

    def _run(self, tiles: torch.Tensor, stream) -> torch.Tensor:
        inputs = tiles.to(self._device, self._in_dtype, non_blocking=True).contiguous()
        self._context.set_input_shape(INPUT_NAME, tuple(inputs.shape))
        output = torch.empty((inputs.shape[0], self.tokens_per_tile, self.hidden_size),
                             dtype=self._out_dtype, device=self._device)
        self._context.set_tensor_address(INPUT_NAME, inputs.data_ptr())
        self._context.set_tensor_address(OUTPUT_NAME, output.data_ptr())
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT vision engine execution failed")
        return output


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unsupported TensorRT tensor dtype {dtype}")
    return table[dtype]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the vision TensorRT engine from ONNX "
                                     "(strongly typed: the precision is the ONNX graph's)")
    parser.add_argument("onnx", type=Path)
    parser.add_argument("engine", type=Path)
    parser.add_argument("--min-tiles", type=int, default=1)
    parser.add_argument("--opt-tiles", type=int, default=13)
    parser.add_argument("--max-tiles", type=int, default=26)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--workspace-gib", type=float, default=8.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        build_engine(args.onnx, args.engine, args.min_tiles, args.opt_tiles, args.max_tiles,
                     args.image_size, args.workspace_gib)
    except ValueError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
