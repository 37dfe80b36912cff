from __future__ import annotations

import pytest

from llm_service.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "北京是中国的首都，上海是最大的城市。",
    "Hello, world! Ça va? naïve café — 日本語のテキスト 🤖🚀",
    "  leading spaces and\nnew lines\n\n  indented",
]


def stream(tokenizer, ids, stop=(), chunk=1):
    detok = IncrementalDetokenizer(tokenizer, stop=stop)
    pieces = []
    for i in range(0, len(ids), chunk):
        delta = detok.add(ids[i:i + chunk])
        pieces.append(delta.text)
        if delta.stopped:
            return pieces, True
    pieces.append(detok.finish().text)
    return pieces, False


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_one_shot(smollm2_tokenizer, text):
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    pieces, _ = stream(smollm2_tokenizer, ids)
    assert "".join(pieces) == smollm2_tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_chinese_needs_more_than_one_token_per_character(smollm2_tokenizer):
    # The test above only proves something if characters really span tokens.
    ids = smollm2_tokenizer.encode(TEXTS[0], add_special_tokens=False)
    assert any("\ufffd" in smollm2_tokenizer.decode([t]) for t in ids)


def test_stop_string_is_cut_and_never_streamed(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("The answer is 42. END of story", add_special_tokens=False)
    pieces, stopped = stream(smollm2_tokenizer, ids, stop=("END",))
    assert stopped
    assert "".join(pieces) == "The answer is 42. "
    assert not any("E" in p for p in pieces)


def test_partial_stop_is_held_then_released(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("a STOP-ish STOPX tail", add_special_tokens=False)
    pieces, stopped = stream(smollm2_tokenizer, ids, stop=("STOPPED",))
    assert not stopped
    assert "".join(pieces) == "a STOP-ish STOPX tail"


def test_stop_across_multibyte_tokens(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("你好世界，再见", add_special_tokens=False)
    pieces, stopped = stream(smollm2_tokenizer, ids, stop=("世界",))
    assert stopped and "".join(pieces) == "你好"


def test_special_tokens_skipped_by_default(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("Paris.<|im_end|>", add_special_tokens=False)
    pieces, _ = stream(smollm2_tokenizer, ids)
    assert "".join(pieces) == "Paris."


def test_several_tokens_at_once_stop_where_the_stop_string_ends(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("The answer is 42. END of story", add_special_tokens=False)
    one_by_one, _ = stream(smollm2_tokenizer, ids, stop=("END",))
    detok = IncrementalDetokenizer(smollm2_tokenizer, stop=("END",))
    delta = detok.add(ids)  # e.g. a stream that fell behind gets its tokens merged
    assert delta.stopped and delta.text == "".join(one_by_one)
    used = ids[: delta.consumed]
    assert "END" in smollm2_tokenizer.decode(used)
    assert "END" not in smollm2_tokenizer.decode(used[:-1])
    assert IncrementalDetokenizer(smollm2_tokenizer).add(ids).consumed == len(ids)
