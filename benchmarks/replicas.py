"""Encoder replicas: embedding-cache hit rate and turn-2 time to first token, with 1 and 3
replicas, with and without content affinity, per media store.

Workload: `--conversations` two-turn chats, each about its own image (`--size`, InternVL2
tiling up to `--max-tiles`). Turn 1 uploads the image as a data: URL; turn 2 names it again,
half the chats by its `mm://` handle (an API client), half by re-sending the bytes (an OpenAI
client replaying the history). Every configuration runs the same chats through the LLM
service's own Generator (the real engine with the embedded SmolLM2 and the LLM service's
encoder client) against in-process encoder servers with the demo tower.

Reported per configuration: turn-2 embedding-cache hits (items served from the replica's LRU
without the tower), turn-2 handle failures (404: a handle the replica could not resolve),
and mean / p50 turn-2 TTFT, with the ratio to the single-replica baseline of the same run.
The memory store with 3 replicas is the situation before the shared store: a handle lives on
the replica that saw it only.

    python -m benchmarks.replicas                       # all configurations (~3-5 min on 2 cores)
    python -m benchmarks.replicas --conversations 12 --stores directory,redis
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from encoder_service.config import EncoderConfig
from encoder_service.server import EncoderServer
from encoder_service.towers.demo import DemoTower
from llm_service.app import build_engine
from llm_service.config import LLMConfig
from llm_service.encoder_client import EncoderClient
from llm_service.encoder_pool import PoolSettings
from llm_service.engine.protocol import EngineClient, SamplingParams
from llm_service.errors import NotFound
from llm_service.generator import GenerateInput, Generator
from llm_service.prompt.families import load_family
from llm_service.prompt.messages import Message, TextPart
from llm_service.tokenizer import load_tokenizer
from llm_service.weights import resolve_checkpoint
from mmserve.wire.media import MediaItem, MediaRef


@dataclass
class Result:
    name: str
    hits: int = 0
    items: int = 0
    not_found: int = 0
    ttft_s: list[float] | None = None


def image_url(seed: int, size: tuple[int, int]) -> str:
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1] // 8, size[0] // 8, 3, generator=generator) * 255).byte()
    image = Image.fromarray(pixels.numpy()).resize(size, Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(url: str, question: str) -> list[Message]:
    return [Message(role="user", parts=(MediaItem(MediaRef(url=url)), TextPart(question)))]


async def first_chunk(generator: Generator, request_id: str, messages: list[Message]):
    """(seconds to the first token, the first chunk)."""
    started = time.perf_counter()
    inp = GenerateInput(request_id=request_id, messages=messages,
                        sampling=SamplingParams(max_tokens=1, temperature=0.0))
    first = None
    async for chunk in generator.generate(inp):
        if first is None:
            first = chunk
    return time.perf_counter() - started, first


async def run_config(name: str, engine: EngineClient, family, tokenizer, replicas: int,
                     store: dict, affinity: bool, args: argparse.Namespace,
                     tower: DemoTower, seed_base: int) -> Result:
    servers = [EncoderServer(EncoderConfig(host="127.0.0.1", port=0, max_tiles=args.max_tiles,
                                           **store), tower=tower) for _ in range(replicas)]
    for server in servers:
        await server.start()
    client = EncoderClient(",".join(f"127.0.0.1:{s.port}" for s in servers), budget_s=60,
                           pool=PoolSettings(affinity=affinity))
    await client.start()
    generator = Generator(engine, tokenizer, family, client)
    result = Result(name, ttft_s=[])
    try:
        urls = [image_url(seed_base + k, (args.size, args.size * 3 // 4))
                for k in range(args.conversations)]
        handles = []
        for k, url in enumerate(urls):  # turn 1: every image is new content
            _, chunk = await first_chunk(generator, f"{name}-{k}-1", chat(url, "Describe it."))
            handles.append(chunk.media_handles[0])
        before = sum(s.encoder.store.hits for s in servers)
        # Turn 2 in another order than turn 1 (users come back when they come back), so plain
        # round-robin lands on the turn-1 replica about 1 time in N, not by a fixed offset.
        order = random.Random(seed_base).sample(range(len(urls)), len(urls))
        for k in order:  # turn 2: the same image, by handle or by bytes
            url = urls[k]
            again = handles[k] if k % 2 == 0 else url
            messages = chat(again, "Describe it.") + [
                Message(role="assistant", parts=(TextPart("An image."),)),
                Message(role="user", parts=(TextPart("What colour dominates?"),))]
            try:
                seconds, _ = await first_chunk(generator, f"{name}-{k}-2", messages)
            except NotFound:
                result.not_found += 1
                continue
            result.ttft_s.append(seconds)
            result.items += 1
        result.hits = sum(s.encoder.store.hits for s in servers) - before
    finally:
        await client.close()
        for server in servers:
            await server.stop(grace=0)
    return result


async def main(args: argparse.Namespace) -> None:
    config = LLMConfig(engine_options={"max_model_len": 4096})
    model_dir = await asyncio.to_thread(resolve_checkpoint, config.checkpoint, None)
    tokenizer = load_tokenizer(model_dir)
    family = load_family(config.family, tokenizer)
    engine = build_engine(config, model_dir)
    await engine.start()
    tower = DemoTower(hidden_size=engine.hidden_size, dtype=torch.float32, seed=0)
    root = Path(tempfile.mkdtemp(prefix="mmserve-replicas-"))
    redis = None
    stores: dict[str, dict] = {"memory": {}}
    wanted = args.stores.split(",")
    if "directory" in wanted:
        (root / "store").mkdir()
        stores["directory"] = {"media_store": "directory", "media_store_path": str(root / "store")}
    if "redis" in wanted:
        if shutil.which("redis-server"):
            import sys

            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from redis_server import RedisServer

            redis = RedisServer(root)
            redis.start()
            stores["redis"] = {"media_store": "redis", "media_store_url": redis.url}
        else:
            print("redis-server not installed: the Redis store is skipped")
    configs = [("1 replica, memory", 1, "memory", True)]
    for store in stores:
        for affinity in (False, True):
            configs.append((f"3 replicas, {store}, affinity {'on' if affinity else 'off'}",
                            3, store, affinity))
    results = []
    try:
        # Warm-up: the engine's first prefill pays one-time costs.
        await run_config("warm-up", engine, family, tokenizer, 1, {}, True,
                         argparse.Namespace(**{**vars(args), "conversations": 1}), tower, 10_000)
        # Every round runs every configuration on new images; the last round is reported
        # (earlier ones warm the engine up for these prompt shapes).
        for round_ in range(args.rounds):
            results = []
            for k, (name, replicas, store, affinity) in enumerate(configs):
                results.append(await run_config(name, engine, family, tokenizer, replicas,
                                                stores[store], affinity, args, tower,
                                                1000 * (k + 1) + 100_000 * round_))
    finally:
        await engine.shutdown()
        if redis is not None:
            redis.stop()
        shutil.rmtree(root, ignore_errors=True)
    baseline = statistics.mean(results[0].ttft_s or [float("nan")])
    print(f"\n{args.conversations} two-turn chats, {args.size}x{args.size * 3 // 4} images, "
          f"max_tiles {args.max_tiles}; turn 2: half by handle, half by bytes; "
          f"round {args.rounds} of {args.rounds}\n")
    print(f"{'configuration':<36} {'turn-2 hits':>12} {'404s':>5} {'TTFT mean':>10} "
          f"{'p50':>7} {'vs 1 replica':>13}")
    for r in results:
        ttft = r.ttft_s or [float("nan")]
        total = r.items + r.not_found
        print(f"{r.name:<36} {r.hits:>5}/{total:<3} {r.hits / max(total, 1):>4.0%} "
              f"{r.not_found:>4} {statistics.mean(ttft) * 1e3:>8.0f}ms "
              f"{statistics.median(ttft) * 1e3:>5.0f}ms {statistics.mean(ttft) / baseline:>12.2f}x")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.replicas", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--size", type=int, default=896, help="image width (height: 3/4 of it)")
    p.add_argument("--max-tiles", type=int, default=2)
    p.add_argument("--stores", default="memory,directory,redis")
    p.add_argument("--rounds", type=int, default=2, help="the last one is reported")
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
