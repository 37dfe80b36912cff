"""The gateway names each API key's tenant to the LLM service (a hash, never the key), so media
handles resolve only for the key that uploaded them; without keys there is no tenant. A media
store outage reaches the client as a 503 that says so."""

from __future__ import annotations

import grpc
from gateway_fake_llm import MODEL_ID

from mmserve.wire.media import MEDIA_STORE_UNAVAILABLE, TENANT_METADATA, valid_tenant

HELLO = [{"role": "user", "content": "hi"}]


async def test_each_key_is_its_own_tenant_and_the_key_never_travels(configured_client,
                                                                    fake_llm) -> None:
    async with configured_client(api_keys=("sk-alice", "sk-bob")) as client:
        for key in ("sk-alice", "sk-bob", "sk-alice"):
            reply = await client.post("/v1/chat/completions", json={
                "model": MODEL_ID, "messages": HELLO}, headers={"Authorization": f"Bearer {key}"})
            assert reply.status_code == 200
    alice, bob, alice_again = (m[TENANT_METADATA] for m in fake_llm.metadata)
    assert alice == alice_again != bob
    assert valid_tenant(alice) and valid_tenant(bob)
    assert not any("sk-" in value for m in fake_llm.metadata for value in m.values())


async def test_without_api_keys_there_is_no_tenant(configured_client, fake_llm) -> None:
    async with configured_client() as client:
        reply = await client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "hi"})
        assert reply.status_code == 200
    assert TENANT_METADATA not in fake_llm.metadata[-1]


async def test_a_media_store_outage_is_a_503_that_says_so(client, fake_llm) -> None:
    message = (f"{MEDIA_STORE_UNAVAILABLE}: the Redis media store failed (ConnectionError); "
               "media handles cannot be resolved until it recovers, so send the media itself")
    fake_llm.fail_with = (grpc.StatusCode.UNAVAILABLE, message)
    reply = await client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": HELLO})
    assert reply.status_code == 503
    assert reply.json()["error"]["message"] == message
    fake_llm.fail_with = (grpc.StatusCode.UNAVAILABLE, "engine at 10.0.0.7:50051 is gone")
    reply = await client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": HELLO})
    assert reply.json()["error"]["message"] == "The model service is unavailable; retry later."
