"""Token estimation shared by the dispatcher (reservations, usage-less streams) and the simulator.

The simulator counts with a deterministic rule (one token per started four characters of
each whitespace-separated chunk, :func:`count_tokens`). The dispatcher's prompt estimate
also runs OpenAI's tokenizers (``bpe-openai``: GitHub's Rust BPE, its token tables in the
wheel, so nothing is fetched at run time): characters / 4 is a quarter of the tokens of
Chinese, emoji or base64. The provider's own count is still what is billed; the estimate is
used only to reserve room under caps, and where a provider reports no usage (events say so:
``usage_estimated``).
"""

from __future__ import annotations

import functools
from typing import Any, Final

import bpe_openai

MESSAGE_OVERHEAD_TOKENS: Final = 4
# A text up to this many characters is tokenized whole (about 0.1 ms per KB for both
# tokenizers on the shared 2-core machine, so at most about 5 ms); a longer one is sampled
# in WINDOWS evenly spaced windows of these characters together, scaled to its length.
# (bpe-openai refuses a text of more than 200,000 tokens; a character is at most 4.)
WHOLE_CHARS: Final = 49_152
WINDOWS: Final = 24


@functools.cache
def _tokenizers() -> tuple[Any, ...]:
    """o200k (gpt-4o, gpt-4.1, the o series) and cl100k (gpt-4, gpt-3.5). Neither always
    counts more: cl100k counts twice o200k's tokens on Chinese, o200k one more on a Russian,
    Japanese and digits string hypothesis found."""
    return tuple(bpe_openai.get_encoding(name) for name in ("o200k_base", "cl100k_base"))


def load_tokenizers() -> None:
    """Load the tokenizers now (about 0.4 s), not on the first request that needs them."""
    _tokenizers()


def bpe_tokens(text: str) -> int:
    """The most tokens OpenAI's tokenizers count in ``text``: exact up to
    :data:`WHOLE_CHARS` characters, sampled beyond."""
    try:
        if len(text) <= WHOLE_CHARS:
            return max(len(t.encode_ordinary(text)) for t in _tokenizers())
        size = WHOLE_CHARS // WINDOWS
        step = (len(text) - size) / (WINDOWS - 1)
        sample = [text[round(i * step) : round(i * step) + size] for i in range(WINDOWS)]
        counted = max(sum(len(t.encode_ordinary(s)) for s in sample) for t in _tokenizers())
        return -(-counted * len(text) // (size * WINDOWS))
    except (ValueError, bpe_openai.TokenizerError):  # not expected: bytes bound every BPE
        return len(text.encode("utf-8", "surrogatepass"))


def count_tokens(text: str) -> int:
    """Deterministic token estimate: ceil(len / 4) per whitespace-separated chunk.

    Every chunk counts at least 1, the empty string counts 0, and the count is
    additive over whitespace joins, which is what lets the simulator generate text
    of an exact token count.
    """
    return sum((len(word) + 3) >> 2 for word in text.split())


def _message_texts(message: Any) -> list[str]:
    """The text contents of one chat message; raises ValueError on a malformed message."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ValueError("each message must be an object with a string 'role'")
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict):
                raise ValueError("content parts must be objects")
            if part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ValueError("a text content part needs a string 'text'")
                texts.append(text)
        return texts
    raise ValueError("content must be a string, a list of parts or null")


def count_message_tokens(messages: list[Any]) -> int:
    """Prompt tokens of chat ``messages`` exactly as the simulator reports them.

    :func:`count_tokens` of every text content (string, or the ``text`` of
    ``{"type": "text"}`` parts; other parts count 0) plus
    :data:`MESSAGE_OVERHEAD_TOKENS` per message. Raises ValueError on malformed input.
    """
    return sum(
        MESSAGE_OVERHEAD_TOKENS + sum(count_tokens(t) for t in _message_texts(m)) for m in messages
    )


def estimate_message_tokens(messages: list[Any]) -> int:
    """A cheap prompt-size estimate for the request path (budget reservations, fallbacks):
    the first of :func:`estimate_message_token_range`."""
    return estimate_message_token_range(messages)[0]


def estimate_message_token_range(messages: list[Any]) -> tuple[int, int]:
    """(estimate, floor) of the prompt tokens of chat ``messages``, cheaply: validates like
    :func:`count_message_tokens`, then counts characters and words (measured on the shared
    2-core machine, busy: 2.4 µs for a one-line prompt, 150 µs for 18 KB of prose, where
    characters alone took 0.5 µs; a prompt that size takes the provider seconds).

    - estimate: the most of characters / 4, the words (every whitespace-separated word is
      at least one token for BPE tokenizers and the simulator: 7,000 one-letter words are
      7,000 tokens, not 3,500) and OpenAI's tokenizer (:func:`bpe_tokens`: Chinese is about
      one token per character, not a quarter). It may be high by a quarter or more (long
      words: 3,900 "word"s are 3,904 tokens, estimated 4,880).
    - floor: what the prompt costs at least, for refusing a call on its prompt alone (a
      user under the cap must not be refused on an estimate that is too high): the words,
      or characters other than spaces / 8 if more (text without spaces), but never more
      than OpenAI's tokenizer counts (32 "=" are one token).
    """
    estimate = floor = 0
    for message in messages:
        texts = _message_texts(message)
        chars = sum(len(t) for t in texts)
        words = sum(len(t.split()) for t in texts)
        spaces = sum(t.count(" ") + t.count("\n") + t.count("\t") for t in texts)
        tokens = sum(bpe_tokens(t) for t in texts)
        estimate += MESSAGE_OVERHEAD_TOKENS + max((chars + 3) // 4, words, tokens)
        floor += MESSAGE_OVERHEAD_TOKENS + min(max(words, (chars - spaces) // 8), tokens)
    return estimate, floor
