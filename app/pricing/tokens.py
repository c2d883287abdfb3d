"""Token estimation shared by the dispatcher (reservations, usage-less streams) and the simulator.

The simulator counts with a deterministic rule (one token per started four characters of
each whitespace-separated chunk, :func:`count_tokens`); the request path's cheap estimate is
characters / 4 or the words. A call that a budget caps is also counted with its model's
OpenAI tokenizer (o200k or cl100k, :func:`encoding_for`; ``bpe-openai``: GitHub's Rust BPE,
its token tables in the wheel, so nothing is fetched at run time): characters / 4 is a
quarter of the tokens of Chinese and a tenth of emoji's, so a reservation fell short of the
prompt's cost. Only capped calls pay for it (a tokenizer takes 34-76 MB once loaded, and
about 0.1 ms per KB of prompt: counting every call with both tripled the dispatcher's added
p99 latency at 64 concurrent calls, ``bench.gateway``).
The provider's own count is still what is billed; the estimate is used only to reserve
room under caps, and where a provider reports no usage (events say so: ``usage_estimated``).
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Final

import bpe_openai

MESSAGE_OVERHEAD_TOKENS: Final = 4
# A text up to this many characters is tokenized whole (at most about 5 ms on the shared
# 2-core machine); a longer one is sampled in WINDOWS evenly spaced windows of these
# characters together, scaled to its length. (bpe-openai refuses a text of more than
# 200,000 tokens; a character is at most 4.)
WHOLE_CHARS: Final = 49_152
WINDOWS: Final = 24
# Model name prefixes (after any "provider/") of o200k's models; the rest count with cl100k:
# gpt-4 and gpt-3.5 use it, and for other providers' models (no OpenAI tokenizer is theirs)
# it is the one that counts more: twice o200k's tokens on Chinese, as many on prose.
O200K_MODELS: Final = ("gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "gpt-oss",
                       "o1", "o3", "o4")  # fmt: skip
_loading = threading.Lock()
_loaded: set[str] = set()


def encoding_for(model: str) -> str:
    """The OpenAI encoding a prompt for ``model`` is counted with."""
    name = model.rsplit("/", 1)[-1].lower()
    return "o200k_base" if name.startswith(O200K_MODELS) else "cl100k_base"


@functools.cache
def _tokenizer(encoding: str) -> Any:
    return bpe_openai.get_encoding(encoding)  # o200k: 76 MB once loaded, cl100k: 34 MB


def load_tokenizer(encoding: str) -> None:
    """Load a tokenizer (about 0.3 s; call it off the event loop the first time)."""
    if encoding not in _loaded:
        with _loading:
            _tokenizer(encoding)
            _loaded.add(encoding)


def tokenizer_loaded(encoding: str) -> bool:
    return encoding in _loaded


def bpe_tokens(text: str, encoding: str = "cl100k_base") -> int:
    """OpenAI tokens of ``text`` in ``encoding``: exact up to :data:`WHOLE_CHARS` characters,
    sampled beyond."""
    load_tokenizer(encoding)
    encode = _tokenizer(encoding).encode_ordinary
    try:
        if len(text) <= WHOLE_CHARS:
            return len(encode(text))
        size = WHOLE_CHARS // WINDOWS
        step = (len(text) - size) / (WINDOWS - 1)
        sample = [text[round(i * step) : round(i * step) + size] for i in range(WINDOWS)]
        return -(-sum(len(encode(s)) for s in sample) * len(text) // (size * WINDOWS))
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
    """The texts of one chat message the model reads (and the provider bills): its content,
    its ``name``, and the names and arguments of earlier tool calls (``tool_calls``, the
    legacy ``function_call``); raises ValueError on a malformed message."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ValueError("each message must be an object with a string 'role'")
    texts = [message["name"]] if isinstance(message.get("name"), str) else []
    calls = message.get("tool_calls")
    functions = (
        [c.get("function") for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []
    )
    for function in [*functions, message.get("function_call")]:
        if isinstance(function, dict):
            texts += [
                function[k] for k in ("name", "arguments") if isinstance(function.get(k), str)
            ]
    content = message.get("content")
    if content is None:
        return texts
    if isinstance(content, str):
        return [*texts, content]
    if isinstance(content, list):
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
    ``{"type": "text"}`` parts; other parts count 0), name and earlier tool call, plus
    :data:`MESSAGE_OVERHEAD_TOKENS` per message. Raises ValueError on malformed input.
    """
    return sum(
        MESSAGE_OVERHEAD_TOKENS + sum(count_tokens(t) for t in _message_texts(m)) for m in messages
    )


def estimate_message_tokens(messages: list[Any], tokenize: str | None = None) -> int:
    """A prompt-size estimate for the request path (budget reservations, fallbacks): the
    first of :func:`estimate_message_token_range`."""
    return estimate_message_token_range(messages, tokenize)[0]


def estimate_message_token_range(
    messages: list[Any], tokenize: str | None = None
) -> tuple[int, int]:
    """(estimate, floor) of the prompt tokens of chat ``messages``, cheaply: validates like
    :func:`count_message_tokens`, then counts characters and words (measured on the shared
    2-core machine, busy: 2.4 µs for a one-line prompt, 150 µs for 18 KB of prose, where
    characters alone took 0.5 µs; a prompt that size takes the provider seconds).

    - estimate: the most of characters / 4 and the words (every whitespace-separated word
      is at least one token for BPE tokenizers and the simulator: 7,000 one-letter words
      are 7,000 tokens, not 3,500), and with ``tokenize`` (an encoding: :func:`encoding_for`
      the model), OpenAI's count (:func:`bpe_tokens`: Chinese is about one token per
      character in cl100k, not a quarter) and a token per started four characters of each
      word (what the bundled simulator bills: more than OpenAI on prose of short words, a
      cap was crossed by 20 % in the sandbox without it; median 1.11 of o200k's count on
      GSM8K prompts). It
      may be high by a quarter or more (long words: 3,900 "word"s are 3,904 tokens,
      estimated 4,880).
    - floor: what the prompt costs at least, for refusing a call on its prompt alone (a
      user under the cap must not be refused on an estimate that is too high): the words,
      or characters other than spaces / 8 if more (text without spaces). With ``tokenize``
      and a prompt counted whole (up to :data:`WHOLE_CHARS` characters in all), the lesser
      of OpenAI's count and the simulator's: both are exact, and one of them bills the call
      (a lone call is served when its floor fits: a words-based floor let a Chinese prompt
      cross a cap by 90 % in the sandbox, 12 times over with gpt-4o). A longer prompt is
      counted once, sampled, and its floor is the heuristic, at most that count.
    """
    texts_of = [_message_texts(message) for message in messages]
    whole = tokenize is not None and sum(len(t) for ts in texts_of for t in ts) <= WHOLE_CHARS
    estimate = floor = 0
    for texts in texts_of:
        chars = sum(len(t) for t in texts)
        words = sum(len(t.split()) for t in texts)
        spaces = sum(t.count(" ") + t.count("\n") + t.count("\t") for t in texts)
        cheap, least = max((chars + 3) // 4, words), max(words, (chars - spaces) // 8)
        if tokenize:
            pieces = sum(count_tokens(t) for t in texts)  # the simulator's own count
            cheap = max(cheap, pieces)
            if whole:  # exact: what OpenAI or the simulator bills at least
                tokens = sum(bpe_tokens(t, tokenize) for t in texts)
                cheap, least = max(cheap, tokens), min(tokens, pieces)
        estimate += MESSAGE_OVERHEAD_TOKENS + cheap
        floor += MESSAGE_OVERHEAD_TOKENS + least
    if tokenize and not whole:
        # A long prompt is counted as one text, sampled, so one request's count is bounded
        # (80 messages of 49,000 characters each, counted whole, held the event loop 0.35 s)
        tokens = MESSAGE_OVERHEAD_TOKENS * len(texts_of) + bpe_tokens(
            "\n".join(t for ts in texts_of for t in ts), tokenize
        )
        estimate, floor = max(estimate, tokens), min(floor, tokens)
    return estimate, floor
