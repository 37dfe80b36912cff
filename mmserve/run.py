"""`make run`: the whole local stack (encoder, LLM, gateway) as three processes.

Starts each service, prefixes its log lines with the service name, waits until
all three are healthy, prints the URL and a curl to paste, and stops them all
cleanly on Ctrl-C (or when any one of them exits).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmserve.rpc.tls import TlsFiles, channel_credentials

COLORS = {"encoder": "\033[36m", "llm": "\033[35m", "gateway": "\033[32m"}
RESET = "\033[0m"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mmserve.run", description=__doc__)
    p.add_argument("--config", default=None,
                   help="model YAML for both services (default: embedded)")
    p.add_argument("--host", default="127.0.0.1", help="gateway bind address")
    p.add_argument("--port", type=int, default=8000, help="gateway port")
    p.add_argument("--llm-port", type=int, default=50051)
    p.add_argument("--encoder-port", type=int, default=50052)
    p.add_argument("--start-timeout", type=float, default=600.0,
                   help="seconds to wait for all services (the first run converts the model)")
    p.add_argument("--tls-cert", help="PEM certificate for 127.0.0.1 (server and client auth): "
                   "the encoder and LLM services serve mutual TLS with it and present it "
                   "as clients")
    p.add_argument("--tls-key", help="PEM key of --tls-cert")
    p.add_argument("--tls-ca", help="PEM CA that signed --tls-cert")
    args = p.parse_args(argv)
    if (args.tls_cert, args.tls_key, args.tls_ca).count(None) not in (0, 3):
        p.error("--tls-cert, --tls-key and --tls-ca go together")
    return args


def commands(args: argparse.Namespace) -> dict[str, list[str]]:
    py = sys.executable
    config = ["--config", args.config] if args.config else []

    def tls(prefix: str) -> list[str]:
        if args.tls_cert is None:
            return []
        return [f"--{prefix}tls-cert", args.tls_cert, f"--{prefix}tls-key", args.tls_key,
                f"--{prefix}tls-ca", args.tls_ca]

    return {
        "encoder": [py, "-m", "encoder_service", "--host", "127.0.0.1",
                    "--port", str(args.encoder_port), *config, *tls("")],
        "llm": [py, "-m", "llm_service", "--host", "127.0.0.1", "--port", str(args.llm_port),
                "--encoder-address", f"127.0.0.1:{args.encoder_port}", *config, *tls(""),
                *tls("encoder-")],
        "gateway": [py, "-m", "gateway", "--host", args.host, "--port", str(args.port),
                    "--llm-address", f"127.0.0.1:{args.llm_port}", *tls("llm-")],
    }


def client_tls(args: argparse.Namespace) -> TlsFiles:
    """The supervisor's health checks present the services' own certificate."""
    return TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)


async def pump(name: str, stream: asyncio.StreamReader, color: bool) -> None:
    prefix = f"{COLORS[name]}{name:>8}{RESET} | " if color else f"{name:>8} | "
    while line := await stream.readline():
        sys.stdout.write(prefix + line.decode(errors="replace"))
        sys.stdout.flush()


async def grpc_serving(address: str, credentials: grpc.ChannelCredentials | None) -> bool:
    channel = (grpc.aio.secure_channel(address, credentials) if credentials
               else grpc.aio.insecure_channel(address))
    async with channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        except grpc.aio.AioRpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def http_ready(url: str) -> bool:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=1.0) as client:
            return (await client.get(url)).status_code == 200
    except httpx.HTTPError:
        return False


async def wait_healthy(args: argparse.Namespace, procs: dict) -> None:
    deadline = time.monotonic() + args.start_timeout
    credentials = channel_credentials(client_tls(args))
    checks = {
        "encoder": lambda: grpc_serving(f"127.0.0.1:{args.encoder_port}", credentials),
        "llm": lambda: grpc_serving(f"127.0.0.1:{args.llm_port}", credentials),
        "gateway": lambda: http_ready(f"http://127.0.0.1:{args.port}/ready"),
    }
    pending = dict(checks)
    while pending:
        for name, proc in procs.items():
            if proc.returncode is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up")
        for name in list(pending):
            if await pending[name]():
                del pending[name]
        if time.monotonic() > deadline:
            raise RuntimeError(f"not healthy after {args.start_timeout:.0f} s: {sorted(pending)}")
        await asyncio.sleep(0.5)


def banner(args: argparse.Namespace, seconds: float) -> str:
    url = f"http://{args.host}:{args.port}"
    return f"""
mmserve is up in {seconds:.1f} s: {url}  (Ctrl-C stops everything)

  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{{
    "model": "smollm2-135m-instruct", "stream": true,
    "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'
"""


async def run(args: argparse.Namespace) -> int:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    color = sys.stdout.isatty()
    started = time.monotonic()
    procs: dict[str, asyncio.subprocess.Process] = {}
    pumps = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    try:
        for name, cmd in commands(args).items():
            # Own process group: Ctrl-C reaches the supervisor only, which then stops each
            # service in order instead of all of them dying mid-request at once.
            procs[name] = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                env=env, start_new_session=True, preexec_fn=_die_with_parent)
            stdout = procs[name].stdout
            assert stdout is not None  # stdout=PIPE
            pumps.append(asyncio.create_task(pump(name, stdout, color)))
        ready = asyncio.create_task(wait_healthy(args, procs))
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if ready in done:
            ready.result()
            print(banner(args, time.monotonic() - started), flush=True)
            waits: set[asyncio.Task[Any]] = {stopped}
            waits.update(asyncio.create_task(p.wait()) for p in procs.values())
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if stopped not in done:
                dead = [n for n, p in procs.items() if p.returncode is not None]
                print(f"{', '.join(dead)} exited; stopping the rest", file=sys.stderr)
                code = 1
        else:
            ready.cancel()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    finally:
        await shutdown(procs)
        for task in pumps:
            task.cancel()
    return code


def _die_with_parent() -> None:
    """Runs in each child before exec: on Linux, SIGTERM it if the supervisor dies without
    cleaning up (SIGKILL, a crash), so no service outlives `make run`."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


async def shutdown(procs: dict[str, asyncio.subprocess.Process], grace: float = 35.0) -> None:
    """SIGTERM each service in turn; each drains (30 s at most by default, at once when idle)
    and gets killed only after `grace`."""
    for name in ("gateway", "llm", "encoder"):
        proc = procs.get(name)
        if proc is None or proc.returncode is not None:
            continue
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
