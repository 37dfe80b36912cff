"""Property-based requests generated from the gateway's own OpenAPI schema never get a 5xx.

The gateway runs under uvicorn in a thread of its own, in front of the fake LLM service, so the
generated requests go through HTTP parsing, validation and the error handlers exactly as a
client's would.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import uvicorn
from gateway_fake_llm import FakeLLMServer

from gateway.app import create_app
from gateway.config import GatewayConfig
from polling import eventually

schemathesis = pytest.importorskip("schemathesis",
                                   reason="the schemathesis package is not installed")
hypothesis = pytest.importorskip("hypothesis")

EXAMPLES_PER_OPERATION = 50


@pytest.fixture(scope="module")
def served_gateway() -> Iterator[str]:
    """The gateway's URL; the gateway and the fake LLM share one event loop in a thread."""
    ready: dict[str, object] = {}
    started = threading.Event()

    async def serve() -> None:
        llm = FakeLLMServer()
        await llm.start()
        app = create_app(GatewayConfig(llm_address=llm.address, max_body_bytes=64 * 1024))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                               log_level="critical", timeout_graceful_shutdown=1))
        ready["server"] = server
        task = asyncio.create_task(server.serve())
        await eventually(lambda: server.started or task.done())
        ready["port"] = server.servers[0].sockets[0].getsockname()[1] if server.started else None
        started.set()
        await task
        await llm.stop()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(30) and ready["port"], "the gateway did not start"
    yield f"http://127.0.0.1:{ready['port']}"
    ready["server"].should_exit = True
    thread.join(30)


def test_generated_requests_get_no_server_error(served_gateway) -> None:
    from hypothesis import HealthCheck, Phase, given, settings

    schema = schemathesis.openapi.from_url(served_gateway + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions",
                                              "/v1/models"}
    seen: list[tuple[str, int]] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            response = case.call(base_url=served_gateway, timeout=10)
            seen.append((operation.path, response.status_code))
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} -> {response.status_code}: "
                f"{response.text[:300]}\nbody: {str(case.body)[:300]}")

        check()
    # The generated requests reached both the validation errors and successful generations.
    statuses = {status for _, status in seen}
    assert 200 in statuses and 400 in statuses
