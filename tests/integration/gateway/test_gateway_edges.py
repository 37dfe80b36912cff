"""What surrounds generation: errors, auth, body limits, probes, metrics and the request log."""

from __future__ import annotations

import logging

import grpc
import httpx
import pytest
from gateway_sse import sse_data

CHAT = {"messages": [{"role": "user", "content": "hello big world"}]}


@pytest.mark.parametrize(("code", "status", "message"), [
    (grpc.StatusCode.INVALID_ARGUMENT, 400, "image 1: unsupported format 'tiff'"),
    (grpc.StatusCode.NOT_FOUND, 404, "unknown media handle mm://sha256:00"),
    (grpc.StatusCode.PERMISSION_DENIED, 403, "file:///etc/passwd is outside the allowed media dir"),
    (grpc.StatusCode.UNAVAILABLE, 503, "The model service is unavailable; retry later."),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "The request timed out."),
    (grpc.StatusCode.INTERNAL, 500, "Internal server error."),
])
@pytest.mark.parametrize("stream", [False, True])
async def test_llm_errors_before_the_first_chunk_get_their_status(
        client, fake_llm, code, status, message, stream) -> None:
    fake_llm.fail_with = (code, "image 1: unsupported format 'tiff'" if status == 400 else
                          message if status < 500 else "engine crashed at model_runner.py:88")
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["message"] == message


async def test_overload_is_429_with_retry_after(client, fake_llm) -> None:
    fake_llm.fail_with = (grpc.StatusCode.RESOURCE_EXHAUSTED, "waiting queue is full (64)")
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.headers["x-request-id"] == fake_llm.requests[0].request_id
    assert response.json()["error"] == {"message": "waiting queue is full (64)",
                                        "type": "rate_limit_error", "param": None,
                                        "code": "rate_limit_exceeded"}
    fake_llm.trailing_metadata = (("retry-after", "5"),)
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.headers["retry-after"] == "5"


async def test_error_mid_stream_is_an_event_then_done(client, fake_llm) -> None:
    fake_llm.fail_with = (grpc.StatusCode.UNAVAILABLE, "encoder pool down")
    fake_llm.fail_after_first = True
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status_code == 200
    events = sse_data(response.text)
    assert [e["choices"][0]["delta"] for e in events[:2]] == [{"role": "assistant", "content": ""},
                                                              {"content": "[0]"}]
    assert events[2] == {"error": {"message": "The model service is unavailable; retry later.",
                                   "type": "server_error", "param": None,
                                   "code": "service_unavailable"}}
    assert events[3:] == ["[DONE]"]


async def test_a_gateway_bug_is_a_generic_500(app, auth_headers, monkeypatch) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr("gateway.routes.chat.chat_request_to_pb", broken)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=transport, base_url="http://gateway",
            headers=auth_headers) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 500
    assert response.json() == {"error": {"message": "Internal server error.",
                                         "type": "server_error", "param": None, "code": None}}


async def test_a_gateway_bug_mid_stream_is_an_error_event(client, monkeypatch) -> None:
    monkeypatch.setattr("gateway.routes.chat.FINISH_REASONS", {})
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = sse_data(response.text)
    assert events[-2]["error"]["message"] == "Internal server error."
    assert events[-1] == "[DONE]"


async def test_llm_service_down(configured_client) -> None:
    async with configured_client(llm_address="127.0.0.1:1", request_timeout_s=5) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 503
        assert (await client.get("/ready")).status_code == 503
        assert (await client.get("/health")).status_code == 200


async def test_validation_errors_name_the_field(client, fake_llm) -> None:
    response = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages.0.content.0.image_url.url"
    response = await client.post("/v1/chat/completions", json={"messages": "hi"})
    assert response.json()["error"]["param"] == "messages"
    response = await client.post("/v1/chat/completions", content=b'{"messages": [',
                                 headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]
    response = await client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}]}]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages.0.content.0.input_audio.data"
    assert fake_llm.requests == []


async def test_unknown_route_gets_an_openai_error(client) -> None:
    response = await client.get("/v1/embeddings")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_api_key_is_required(client, fake_llm) -> None:
    request = client.build_request("POST", "/v1/chat/completions", json=CHAT)
    del request.headers["authorization"]
    assert (await client.send(request)).status_code == 401
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"},
                    {"Authorization": "Basic c2stdGVzdC1rZXk="}):
        response = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    assert (await client.get("/v1/models", headers={"Authorization": ""})).status_code == 401
    assert fake_llm.requests == []
    for path in ("/health", "/ready", "/metrics"):
        assert (await client.get(path, headers={"Authorization": ""})).status_code == 200


async def test_no_keys_means_open(configured_client) -> None:
    async with configured_client() as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_body_size_cap(configured_client, fake_llm) -> None:
    async with configured_client(max_body_bytes=2048) as client:
        big = {"messages": [{"role": "user", "content": "x" * 4096}]}
        response = await client.post("/v1/chat/completions", json=big)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"

        async def chunked():  # no Content-Length: the cap applies while reading
            for _ in range(8):
                yield b" " * 512

        response = await client.post("/v1/chat/completions", content=chunked(),
                                     headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert "content-length" not in response.request.headers
        small = {"messages": [{"role": "user", "content": "x" * 1024}]}
        assert (await client.post("/v1/chat/completions", json=small)).status_code == 200
    assert len(fake_llm.requests) == 1


async def test_readiness_follows_the_llm_health_service(client, llm_server) -> None:
    assert (await client.get("/ready")).json() == {"status": "ready"}
    await llm_server.set_serving(False)
    response = await client.get("/ready")
    assert response.status_code == 503
    assert (await client.get("/health")).json() == {"status": "ok"}


def metric(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]
    assert len(values) == 1, (name, values)
    return values[0]


async def test_metrics(client, fake_llm) -> None:
    await client.post("/v1/chat/completions", json=CHAT)
    await client.post("/v1/chat/completions", json={**CHAT, "stream": True, "n": 2})
    await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer no"})
    fake_llm.fail_with = (grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
    await client.post("/v1/chat/completions", json=CHAT)
    text = (await client.get("/metrics")).text
    route = 'route="/v1/chat/completions"'
    assert metric(text, f'mmserve_gateway_requests_total{{{route},status="200"}}') == 2
    assert metric(text, f'mmserve_gateway_requests_total{{{route},status="429"}}') == 1
    assert metric(text, 'mmserve_gateway_requests_total{route="unrouted",status="401"}') == 1
    assert metric(text, f"mmserve_gateway_time_to_first_token_seconds_count{{{route}}}") == 2
    assert metric(text, f"mmserve_gateway_request_duration_seconds_count{{{route}}}") == 3
    assert metric(text, "mmserve_gateway_generation_tokens_total") == 4 + 8
    assert metric(text, "mmserve_gateway_prompt_tokens_total") == 3 + 3
    assert metric(text, "mmserve_gateway_requests_in_flight") == 1  # the scrape itself


async def test_one_log_line_per_request(client, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.requests"):
        response = await client.post("/v1/chat/completions", json=CHAT)
    line, = [r.getMessage() for r in caplog.records if r.name == "gateway.requests"]
    assert line.startswith(f"http=/v1/chat/completions "
                           f"request_id={response.headers['x-request-id']} status=200 ms=")
    assert " method=POST prompt_tokens=3 completion_tokens=4 ttft_ms=" in line


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/v1/chat/completions", {**CHAT, "max_tokens": 4097}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 10**9}, "max_completion_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, "max_tokens"),
])
async def test_max_tokens_beyond_the_context_length_is_a_400(client, fake_llm, route, body,
                                                             param) -> None:
    response = await client.post(route, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and "max_model_len 4096" in error["message"]
    assert fake_llm.requests == []


async def test_max_tokens_up_to_the_context_length_is_passed_on(client, fake_llm) -> None:
    response = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4096})
    assert response.status_code == 200
    assert fake_llm.requests[0].sampling.max_tokens == 4096


@pytest.mark.parametrize("field", ["min_tokens", "top_k", "max_tokens", "stop_token_ids"])
async def test_counts_beyond_uint32_are_a_400_not_a_crash(client, fake_llm, field) -> None:
    value = [2**32] if field == "stop_token_ids" else 2**40
    response = await client.post("/v1/completions", json={"prompt": "hi", field: value})
    assert response.status_code == 400
    assert response.json()["error"]["param"].startswith(field)
    assert fake_llm.requests == []


async def test_probes_log_at_debug_and_requests_at_info(client, caplog) -> None:
    with caplog.at_level(logging.DEBUG, logger="gateway.requests"):
        await client.get("/health")
        await client.post("/v1/chat/completions", json=CHAT)
    levels = {r.getMessage().split(" ")[0].removeprefix("http="): r.levelno
              for r in caplog.records if r.name == "gateway.requests"}
    assert levels == {"/health": logging.DEBUG, "/v1/chat/completions": logging.INFO}


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages.0.content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", '
     b'"text": "x\\udfff"}]}]}', "messages.0.content.0.text"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], '
     b'"stop": ["ok", "\\ud83d"]}', "stop.1"),
    ("/v1/completions", b'{"prompt": "hi", "stop": "\\ud800"}', "stop"),
])
async def test_a_lone_surrogate_is_a_400_naming_the_field(client, fake_llm, route, body,
                                                          param) -> None:
    response = await client.post(route, content=body,
                                 headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and "lone UTF-16 surrogate" in error["message"]
    assert error["message"].startswith(param)
    assert fake_llm.requests == []


async def test_a_surrogate_pair_is_fine(client, fake_llm) -> None:
    response = await client.post("/v1/chat/completions", headers={
        "content-type": "application/json"},
        content=b'{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}]}')
    assert response.status_code == 200
    assert fake_llm.requests[0].messages.messages[0].content[0].text == "smile \U0001f600"


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
async def test_n_beyond_the_engines_limit_is_refused_at_the_edge(client, fake_llm, route) -> None:
    body = CHAT if route == "/v1/chat/completions" else {"prompt": "hi"}
    response = await client.post(route, json={**body, "n": 65})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "n" and "max_num_seqs=64" in error["message"]
    assert fake_llm.requests == []  # nothing reached the LLM service
    response = await client.post(route, json={**body, "n": 64, "max_tokens": 1})
    assert response.status_code == 200


async def test_readiness_follows_the_encoder_the_llm_service_reports(client, llm_server) -> None:
    from grpc_health.v1 import health_pb2

    encoder = "mmserve.encoder.v1.Encoder"
    await llm_server.health.set(encoder, health_pb2.HealthCheckResponse.NOT_SERVING)
    response = await client.get("/ready")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "reason": "encoder"}
    await llm_server.health.set(encoder, health_pb2.HealthCheckResponse.SERVING)
    assert (await client.get("/ready")).json() == {"status": "ready"}
