"""The gRPC kit's drain and internal token, on a real grpc.aio server on port 0 serving a
raw-bytes streaming method (mmserve.rpc.server, .drain, .auth)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmserve.rpc.auth import TOKEN_KEY, read_token, token_interceptors
from mmserve.rpc.drain import DRAINING_MESSAGE
from mmserve.rpc.server import GrpcServer

SERVICE = "test.Ticks"
METHOD = f"/{SERVICE}/Stream"


async def _ticks(request: bytes, context: grpc.aio.ServicerContext):
    for i in range(int(request)):
        await asyncio.sleep(0.05)
        yield str(i).encode()


async def _serve(token: bytes | None = None) -> tuple[GrpcServer, str]:
    server = GrpcServer(SERVICE, token=token)
    server.grpc.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {"Stream": grpc.unary_stream_rpc_method_handler(_ticks)}),))
    port = await server.start("127.0.0.1", 0)
    await server.set_serving(True)
    return server, f"127.0.0.1:{port}"


async def _health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=2)
    return reply.status


async def test_stop_lets_streams_finish_refuses_new_calls_and_reports_not_serving():
    server, address = await _serve()
    async with grpc.aio.insecure_channel(address) as channel:
        stream = channel.unary_stream(METHOD)(b"20", timeout=10)  # ~1 s of ticks
        first = await stream.read()
        assert first == b"0"
        started = time.monotonic()
        stopping = asyncio.create_task(server.stop(grace=30))
        await asyncio.sleep(0.1)
        assert await _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary_stream(METHOD)(b"1", timeout=5).read()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert refused.value.details() == DRAINING_MESSAGE
        rest = []
        while (message := await stream.read()) is not grpc.aio.EOF:
            rest.append(message)
        assert rest[-1] == b"19" and len(rest) == 19  # the whole stream, nothing cut
        await stopping
        # Stop returns once the last stream ended, far inside the 30 s grace.
        assert time.monotonic() - started < 5


async def test_stop_cuts_what_is_still_running_when_the_grace_ends():
    server, address = await _serve()
    async with grpc.aio.insecure_channel(address) as channel:
        stream = channel.unary_stream(METHOD)(b"1000", timeout=30)
        await stream.read()
        started = time.monotonic()
        await server.stop(grace=0.3)
        assert time.monotonic() - started < 3
        with pytest.raises(grpc.aio.AioRpcError):
            while await stream.read() is not grpc.aio.EOF:
                pass


async def test_token_is_required_except_for_health(tmp_path):
    path = tmp_path / "token"
    path.write_text("s3cret-token\n")
    token = read_token(path)
    assert token == b"s3cret-token"
    server, address = await _serve(token)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
            for metadata in ((), ((TOKEN_KEY, "wrong"),), ((TOKEN_KEY, "s3cret-toke"),)):
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await channel.unary_stream(METHOD)(b"1", metadata=metadata).read()
                assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "--internal-token-file" in denied.value.details()
        async with grpc.aio.insecure_channel(address,
                                             interceptors=token_interceptors(token)) as channel:
            replies = [m async for m in channel.unary_stream(METHOD)(b"3", timeout=5)]
            assert replies == [b"0", b"1", b"2"]
    finally:
        await server.stop(grace=0)


def test_an_empty_token_file_is_refused(tmp_path):
    path = tmp_path / "token"
    path.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        read_token(path)
    assert read_token(None) is None and token_interceptors(None) == []
