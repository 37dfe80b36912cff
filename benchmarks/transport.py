"""Embedding transport from the encoder to the LLM service over loopback: in-band vs /dev/shm.

The encoder's real gRPC servicer runs in this process, in front of a stand-in encoder that
answers every item at once with one fixed synthetic item, InternVL2-26B sized by default:
13 tiles x 256 rows x 6144 hidden in bfloat16 (39 MiB). So a call's time is the transport:
the servicer sending the rows (chunks, or a file it writes) and the LLM service's
EncoderClient receiving them into a tensor. One client offers a shared-memory directory,
the other does not; they alternate call by call.

    python -m benchmarks.transport                 # 20 calls each
    python -m benchmarks.transport --calls 50 --shm-dir /dev/shm
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import tempfile
import time

import grpc
import torch

from encoder_service.config import EncoderConfig
from encoder_service.families import build_preprocessor
from encoder_service.server import EncoderServicer
from llm_service.encoder_client import EncoderClient
from mmserve.wire.media import EncodedItem, MediaItem, MediaRef, handle_for
from protos import encoder_pb2_grpc

TOKENS_PER_TILE = 256


class PresetEncoder:
    """Stands in for encoder_service.encoder.Encoder: every item is the same stored result."""

    def __init__(self, tiles: int, hidden_size: int, dtype: torch.dtype) -> None:
        rows = torch.randn(tiles * TOKENS_PER_TILE, hidden_size,
                           generator=torch.Generator().manual_seed(0)).to(dtype)
        self.item = EncodedItem(rows, "0" * 64, handle_for("0" * 64), tiles, cached=True)

    async def encode_all(self, items):
        for _ in items:
            yield [self.item]


async def timed_calls(client: EncoderClient, item: MediaItem, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        ((result,),) = await client.encode([item], "bench")
        times.append(time.perf_counter() - started)
        del result
    return times


async def run(args: argparse.Namespace) -> None:
    shm_dir = args.shm_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.mkdtemp())
    dtype = getattr(torch, args.dtype)
    config = EncoderConfig(host="127.0.0.1", port=0, hidden_size=args.hidden, dtype=args.dtype,
                           shm_dir=shm_dir)
    servicer = EncoderServicer(config, build_preprocessor(config))
    servicer.encoder = PresetEncoder(args.tiles, args.hidden, dtype)
    server = grpc.aio.server()
    encoder_pb2_grpc.add_EncoderServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    clients = {"in-band": EncoderClient(address), "shm": EncoderClient(address, shm_dir=shm_dir)}
    item = MediaItem(MediaRef(url=handle_for("0" * 64)))
    try:
        ((first,),) = await clients["in-band"].encode([item], "warm-up")
        rows, hidden = first.embeddings.shape
        nbytes = first.embeddings.numel() * first.embeddings.element_size()
        for client in clients.values():
            await timed_calls(client, item, 2)
        times: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(args.calls):
            for name, client in clients.items():
                times[name] += await timed_calls(client, item, 1)
    finally:
        for client in clients.values():
            await client.close()
        await server.stop(0)
    leftovers = [n for n in os.listdir(shm_dir) if n.startswith("mmserve-")]
    print(f"item: {first.num_tiles} tiles, {rows} x {hidden} {args.dtype} = "
          f"{nbytes / 2**20:.1f} MiB; {args.calls} calls per transport over loopback; "
          f"shm dir {shm_dir}")
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:>8}: median {median[name] * 1e3:7.1f} ms  min {min(values) * 1e3:7.1f} ms"
              f"  ({nbytes / median[name] / 2**30:5.2f} GiB/s)")
    print(f"   ratio: in-band / shm = {median['in-band'] / median['shm']:.1f}x (medians)")
    copies = []
    for _ in range(5):
        started = time.perf_counter()
        first.embeddings.clone()
        copies.append(time.perf_counter() - started)
    print(f"for scale, one in-memory copy (clone) of the item: "
          f"{statistics.median(copies) * 1e3:.1f} ms")
    print(f"leftover mmserve-* files in {shm_dir}: {len(leftovers)}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transport", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--tiles", type=int, default=13)
    parser.add_argument("--hidden", type=int, default=6144)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--shm-dir", default="", help="default: /dev/shm, else a temp dir")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)  # the servicer logs every call at INFO
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
