"""The request path's prompt estimate and floor against the simulator's own token count
(one token per started four characters of each word, the way BPE tokenizers give every
word at least one token)."""

from __future__ import annotations

import random
from pathlib import Path

import bpe_openai
from hypothesis import given, settings
from hypothesis import strategies as st

from app.pricing.tokens import (
    MESSAGE_OVERHEAD_TOKENS,
    WHOLE_CHARS,
    count_message_tokens,
    estimate_message_token_range,
)

WORDS = st.text(alphabet=st.sampled_from("abcdefghij KLM\n-\t  "), max_size=400)


@given(st.lists(WORDS, min_size=1, max_size=4))
def test_the_floor_is_never_above_the_count(texts: list[str]) -> None:
    messages = [{"role": "user", "content": text} for text in texts]
    estimate, floor = estimate_message_token_range(messages)
    assert floor <= count_message_tokens(messages)
    assert floor <= estimate


def test_one_letter_words_are_not_halved() -> None:
    messages = [{"role": "user", "content": " ".join(["a"] * 7000)}]
    estimate, floor = estimate_message_token_range(messages)
    assert estimate == floor == count_message_tokens(messages) == 7004


def test_long_words_keep_an_estimate_above_and_a_floor_at_the_count() -> None:
    messages = [{"role": "user", "content": " ".join(["word"] * 3900)}]
    estimate, floor = estimate_message_token_range(messages)
    assert floor == count_message_tokens(messages) == 3904 < estimate


# Text real tokenizers split finer than one token per four characters: CJK, emoji, digits,
# base64, punctuation, other scripts (a prompt of these was reserved at a quarter of its
# cost: a $0.29 call admitted under a $0.10 cap).
SCRIPTS = [
    "abcdefghijklmnopqrstuvwxyz     ",
    "你好世界中文测试。，",  # noqa: RUF001 (a full-width comma: Chinese text)
    "こんにちは世界テスト",
    "🙂🚀👍❤️",
    "0123456789",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
    "!@#$%^&*()[]{}<>?/\\|~`",
    "привет мир тест ",
    "ـابتثجحخدذرزسشصضطظعغ ",
    "\n\t  ",
]
MIXED = st.lists(
    st.sampled_from(SCRIPTS).flatmap(lambda s: st.text(alphabet=st.sampled_from(s), max_size=300)),
    min_size=1,
    max_size=6,
).map("".join)


def openai_counts(messages: list[dict[str, str]]) -> list[int]:
    """The prompt tokens OpenAI's own tokenizers count (o200k: gpt-4o, o-series; cl100k:
    gpt-4, gpt-3.5), plus the per-message overhead the estimate adds."""
    counts = []
    for name in ("o200k_base", "cl100k_base"):
        encoding = bpe_openai.get_encoding(name)
        counts.append(
            sum(
                MESSAGE_OVERHEAD_TOKENS + len(encoding.encode_ordinary(m["content"]))
                for m in messages
            )
        )
    return counts


@settings(max_examples=200, deadline=None)
@given(st.lists(MIXED, min_size=1, max_size=3))
def test_the_estimate_covers_what_openai_tokenizers_count(texts: list[str]) -> None:
    messages = [{"role": "user", "content": text} for text in texts]
    estimate, floor = estimate_message_token_range(messages)
    assert estimate >= max(openai_counts(messages))
    assert floor <= min([*openai_counts(messages), count_message_tokens(messages)])


def test_chinese_after_pages_of_english_is_counted() -> None:
    text = "Summarise this. " * 1000 + "中文测试你好世界" * 3000  # English head, CJK tail
    assert len(text) <= WHOLE_CHARS
    estimate, _ = estimate_message_token_range([{"role": "user", "content": text}])
    assert estimate >= max(openai_counts([{"role": "user", "content": text}]))


def test_a_prompt_past_the_whole_count_is_sampled_within_a_few_percent() -> None:
    rng = random.Random(7)
    parts = ["Summarise this report. ", "中文测试你好世界。", "0123456789 ", "🙂🚀 ", "привет мир "]
    pieces = [
        "".join(rng.choice(parts) * rng.randrange(1, 60) for _ in range(40)) for _ in range(30)
    ]
    text = "".join(pieces)
    assert len(text) > 4 * WHOLE_CHARS
    estimate, floor = estimate_message_token_range([{"role": "user", "content": text}])
    # counted piece by piece (a piece ends with a space or a full stop: the pieces' tokens
    # are the text's, give or take one at each of the 29 joins)
    exact = [
        sum(n)
        for n in zip(
            *(openai_counts([{"role": "user", "content": p}]) for p in pieces), strict=True
        )
    ]
    overheads = MESSAGE_OVERHEAD_TOKENS * (len(pieces) - 1)
    assert 0.95 * (max(exact) - overheads) <= estimate <= 1.1 * (max(exact) - overheads)
    assert floor <= min(exact) - overheads


def test_english_prose_is_not_over_reserved() -> None:
    prose = (Path(__file__).parents[2] / "README.md").read_text()
    messages = [{"role": "user", "content": prose}]
    estimate, _ = estimate_message_token_range(messages)
    assert estimate <= 1.3 * max(openai_counts(messages))
