"""The request path's prompt estimate and floor against the simulator's own token count
(one token per started four characters of each word, the way BPE tokenizers give every
word at least one token)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from app.pricing.tokens import count_message_tokens, estimate_message_token_range

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
