"""EngineRequest -> executor Request: prompt tables, fake ids, extra ids, sampling, stops."""

from __future__ import annotations

import pytest
import torch

from llm_service.engine.errors import InvalidRequest
from llm_service.engine.protocol import EmbeddingSpan, EngineRequest, SamplingParams
from llm_service.engine.trtllm.options import EngineLayout
from llm_service.engine.trtllm.requests import (
    build_prompt_table,
    build_request,
    executor_priority,
    media_extra_id,
)

VOCAB, HIDDEN, PLACEHOLDER = 1000, 16, 7


@pytest.fixture
def layout(engine_dir) -> EngineLayout:
    return EngineLayout.read(engine_dir)


def image(rows: int, seed: int, name: str, start: int) -> EmbeddingSpan:
    generator = torch.Generator().manual_seed(seed)
    return EmbeddingSpan(start, torch.randn(rows, HIDDEN, generator=generator), name)


def prompt_with(spans: list[EmbeddingSpan], length: int) -> list[int]:
    ids = [100 + i for i in range(length)]
    for span in spans:
        ids[span.start:span.end] = [PLACEHOLDER] * span.length
    return ids


@pytest.mark.parametrize("sizes", [[10], [10, 20], [5, 30, 12]])
def test_prompt_table_rows_and_slot_ids(layout, sizes):
    spans, start = [], 2
    for i, rows in enumerate(sizes):
        spans.append(image(rows, seed=i, name=f"sha256:{i}", start=start))
        start += rows + 3  # text between images
    ids = prompt_with(spans, start + 2)
    table = build_prompt_table(ids, tuple(reversed(spans)), layout)  # order comes from start
    assert table.table.shape == (sum(sizes), HIDDEN)
    assert table.table.dtype == torch.float16  # the engine dtype from config.json
    row = 0
    for span in spans:
        slots = table.input_token_ids[span.start:span.end]
        assert slots == list(range(VOCAB + row, VOCAB + row + span.length))
        torch.testing.assert_close(table.table[row:row + span.length], span.embeddings.half())
        row += span.length
    text = [i for i, t in enumerate(ids) if t != PLACEHOLDER]
    assert [table.input_token_ids[i] for i in text] == [ids[i] for i in text]
    assert all(table.extra_ids[i] == 0 for i in text)


def test_extra_ids_follow_the_media_content(layout):
    a1, b = image(10, 0, "sha256:aaa", 1), image(10, 1, "sha256:bbb", 12)
    a2 = image(10, 0, "sha256:aaa", 23)
    table = build_prompt_table(prompt_with([a1, b, a2], 35), (a1, b, a2), layout)
    extra = table.extra_ids
    assert extra[1:11] == [media_extra_id("sha256:aaa")] * 10
    assert extra[12:22] == [media_extra_id("sha256:bbb")] * 10
    assert extra[23:33] == extra[1:11]  # same image, same extra ids
    assert extra[1] != extra[12] and extra[1] > 0 and extra[12] > 0
    assert extra[0] == extra[11] == extra[22] == 0
    assert all(0 < e < 2**64 for e in (extra[1], extra[12]))


def test_text_only_has_no_table(layout):
    table = build_prompt_table([1, 2, 3], (), layout)
    assert table == type(table)([1, 2, 3], None, None)


def test_too_many_rows_are_refused_with_the_limit(layout):
    # 256 table rows / max_batch_size 4 = 64 rows per request
    spans = (image(40, 0, "sha256:a", 0), image(30, 1, "sha256:b", 40))
    with pytest.raises(InvalidRequest, match=r"70 embedding rows.*at most 64 per request"):
        build_prompt_table(prompt_with(list(spans), 80), spans, layout)


def test_engine_without_prompt_table_refuses_media(make_engine_dir):
    layout = EngineLayout.read(make_engine_dir(max_prompt_embedding_table_size=0))
    span = image(4, 0, "sha256:a", 0)
    with pytest.raises(InvalidRequest, match="without a prompt table"):
        build_prompt_table(prompt_with([span], 8), (span,), layout)


def test_wrong_width_and_overlaps_are_refused(tle, layout):
    # The span geometry check is the one both engines share (engine/validation.py).
    wide = EmbeddingSpan(0, torch.zeros(4, HIDDEN + 1), "sha256:w")
    with pytest.raises(InvalidRequest, match=f"expects \\[rows, {HIDDEN}\\]"):
        build_request(tle, EngineRequest("r", [PLACEHOLDER] * 8, spans=(wide,)), layout, 320,
                      True, None)
    a, b = image(4, 0, "sha256:a", 0), image(4, 1, "sha256:b", 2)
    with pytest.raises(InvalidRequest, match="overlaps"):
        build_request(tle, EngineRequest("r", [PLACEHOLDER] * 8, spans=(a, b)), layout, 320,
                      True, None)


def test_greedy_sampling_maps_to_top_k_1(tle, layout):
    greedy = EngineRequest("r", [1, 2, 3], SamplingParams(temperature=0.0))
    request, _, _ = build_request(tle, greedy, layout, 320, streaming=True, pad_id=None)
    config = request.sampling_config
    assert (config.beam_width, config.top_k, config.top_p, config.temperature) == (1, 1, None, None)


def test_sampling_fields_map_one_to_one(tle, layout):
    sp = SamplingParams(max_tokens=9, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=3,
                        min_tokens=2, repetition_penalty=1.1, presence_penalty=0.5,
                        frequency_penalty=-0.5, logprobs=0, n=2)
    request, _, _ = build_request(tle, EngineRequest("r", [1, 2, 3], sp), layout, 320, True, None)
    c = request.sampling_config
    assert (c.temperature, c.top_p, c.top_k, c.min_p, c.seed, c.min_tokens) == (
        0.7, 0.9, 40, 0.05, 3, 2)
    assert (c.repetition_penalty, c.presence_penalty, c.frequency_penalty) == (1.1, 0.5, -0.5)
    assert c.num_return_sequences == 2
    assert request.max_tokens == 9 and request.streaming
    output = request.output_config
    assert output.return_log_probs and output.exclude_input_from_output


def test_eos_and_stop_ids_become_end_id_and_stop_words(tle, layout):
    sp = SamplingParams(stop_token_ids=(5, 6, 2))
    request, _, _ = build_request(tle, EngineRequest("r", [1, 2, 3], sp, eos_token_ids=(2, 9)),
                            layout, 320, True, None)
    assert (request.end_id, request.pad_id) == (2, 2)
    assert request.stop_words == [[9], [5], [6], [2]]
    ignoring, _, _ = build_request(tle, EngineRequest("r", [1, 2, 3], SamplingParams()), layout,
                                   320, True, 0)
    assert (ignoring.end_id, ignoring.pad_id, ignoring.stop_words) == (-1, 0, None)


def test_lengths_are_checked_and_max_tokens_clamped(tle, layout):
    request, _, max_tokens = build_request(
        tle, EngineRequest("r", [1] * 100, SamplingParams(max_tokens=100)), layout, 120, True, None)
    assert request.max_tokens == max_tokens == 20
    with pytest.raises(InvalidRequest, match="at most 256"):
        build_request(tle, EngineRequest("r", [1] * 257), layout, 320, True, None)
    with pytest.raises(InvalidRequest, match="empty"):
        build_request(tle, EngineRequest("r", []), layout, 320, True, None)


def test_priority_maps_onto_the_executor_range_in_order(tle, layout):
    levels = [-200, -10, -1, 0, 1, 10, 99]
    mapped = [executor_priority(p) for p in levels]
    assert mapped[levels.index(0)] == 0.5  # the executor's default
    assert all(0.0 <= m <= 1.0 for m in mapped)
    assert mapped == sorted(mapped) and len(set(mapped)) == len(mapped)
    request, _, _ = build_request(tle, EngineRequest("r", [1, 2], priority=3), layout, 320, True,
                               None)
    assert request.priority == executor_priority(3) > 0.5


def test_priority_on_a_binding_without_it_is_a_clear_error(tle, layout, monkeypatch):
    original = tle.Request

    def old_request(*args, priority=None, **kwargs):
        if priority is not None:
            raise TypeError("__init__(): incompatible constructor arguments")
        return original(*args, **kwargs)

    monkeypatch.setattr(tle, "Request", old_request)
    request, _, _ = build_request(tle, EngineRequest("r", [1, 2]), layout, 320, True, None)
    assert request.priority == 0.5  # no priority sent: the binding's default
    with pytest.raises(InvalidRequest, match="no request priorities"):
        build_request(tle, EngineRequest("r", [1, 2], priority=1), layout, 320, True, None)


def test_top_logprobs_are_refused_and_chosen_token_logprobs_asked_for(tle, layout):
    with pytest.raises(InvalidRequest, match="top_logprobs"):
        build_request(tle, EngineRequest("r", [1, 2], SamplingParams(logprobs=2)), layout, 320,
                      True, None)
    request, _, _ = build_request(tle, EngineRequest("r", [1, 2], SamplingParams(logprobs=0)),
                                  layout, 320, True, None)
    assert request.output_config.return_log_probs is True
    assert request.output_config.return_perf_metrics is True
