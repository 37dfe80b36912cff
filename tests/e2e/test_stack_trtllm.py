"""The same end-to-end checks with `engine.kind: trtllm` against the fake executor bindings.

The fake executor (tests/fakes) echoes the prompt's text tokens, so answers are
deterministic; the rest of the stack (encoder, prompt table, gateway) is real.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import yaml

from e2e_stack import MODEL, data_url, png_bytes, start_stack, stop

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
FAKES = Path(__file__).resolve().parents[1] / "fakes"


@pytest.fixture(scope="module")
def stack(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trtllm")
    engine_dir = root / "engine"
    engine_dir.mkdir()
    (engine_dir / "config.json").write_text(json.dumps({
        "pretrained_config": {"architecture": "LlamaForCausalLM", "vocab_size": 49152,
                              "hidden_size": 576, "dtype": "float32",
                              "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1}},
        "build_config": {"max_batch_size": 8, "max_input_len": 4096, "max_seq_len": 8192,
                         "max_num_tokens": 8192, "max_prompt_embedding_table_size": 8 * 4096,
                         "plugin_config": {"paged_kv_cache": True, "tokens_per_block": 32}},
    }))
    config = yaml.safe_load(Path("mmserve/configs/smollm2-demo.yaml").read_text())
    config["llm"]["checkpoint"] = str(smollm2_dir)
    config["engine"] = {"kind": "trtllm", "engine_dir": str(engine_dir)}
    config_path = root / "model.yaml"
    config_path.write_text(yaml.safe_dump(config))
    path = os.pathsep.join(filter(None, [str(FAKES), os.environ.get("PYTHONPATH")]))
    stack = start_stack(root / "mmserve.log", "--config", str(config_path), env={"PYTHONPATH": path})
    yield stack
    stop(stack.proc)


@pytest.fixture(scope="module")
def client(stack):
    from openai import OpenAI

    return OpenAI(base_url=stack.base + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, content, **kw):
    kw.setdefault("max_tokens", 200)
    return client.chat.completions.create(
        model=MODEL, temperature=0, messages=[{"role": "user", "content": content}], **kw)


def test_text_chat_echoes_through_the_executor(client):
    # The fake echoes the prompt; the first <|im_end|> (a stop token) ends the answer.
    reply = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=200, messages=[
        {"role": "system", "content": "Echo: the capital of France is Paris."},
        {"role": "user", "content": "What is the capital of France?"}])
    assert reply.choices[0].message.content == "system\nEcho: the capital of France is Paris."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens > 0


def test_streamed_text_is_identical(client):
    full = chat(client, "Name three rivers.").choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in
              chat(client, "Name three rivers.", stream=True) if c.choices]
    assert len(pieces) > 2 and "".join(pieces) == full


def test_image_chat_counts_embedding_slots(client):
    text_only = chat(client, [{"type": "text", "text": "Describe the image."}], max_tokens=4)
    with_image = chat(client, [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(1000, 600))}},
        {"type": "text", "text": "Describe the image."},
    ], max_tokens=4)
    assert with_image.usage.prompt_tokens - text_only.usage.prompt_tokens == 7 * 256


def test_bad_base64_image_is_a_400(client):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        chat(client, [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}])
    assert info.value.status_code == 400


def test_services_still_healthy(stack):
    assert httpx.get(stack.base + "/ready", timeout=5).status_code == 200
    stop(stack.proc)
    assert stack.proc.returncode == 0
