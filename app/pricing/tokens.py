"""Token estimation shared by the dispatcher (reservations, usage-less streams) and the simulator.

The simulator counts with a deterministic rule (one token per started four characters of
each whitespace-separated chunk, :func:`count_tokens`); the request path's cheap estimate is
characters / 4 or the words. A call that a budget caps is also counted with its model's
OpenAI tokenizer (o200k or cl100k, :func:`encoding_for`; ``bpe-openai``: GitHub's Rust BPE,
its token tables in the wheel, so nothing is fetched at run time): characters / 4 is a
quarter of the tokens of Chinese and a tenth of emoji's, so a reservation fell short of the
prompt's cost. Only capped calls pay for it (a tokenizer takes 29-63 MB once loaded, and
about 0.1 ms per KB of prompt: counting every call with both tripled the dispatcher's added
p99 latency at 64 concurrent calls, ``bench.gateway``). An upstream that says how it
counts (``UpstreamConfig.prompt_counter``) is counted that way alone.
The provider's own count is still what is billed; the estimate is used only to reserve
room under caps, and where a provider reports no usage (events say so: ``usage_estimated``).
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
import threading
from collections.abc import Generator, Iterator
from typing import Any, Final, TypeVar, cast

import bpe_openai
import bpe_openai._bindings
import orjson

_T = TypeVar("_T")

MESSAGE_OVERHEAD_TOKENS: Final = 4
# A text is counted in pieces of about this many characters, and a count hands the event
# loop back between pieces (:func:`count_prompt`): 1-2 ms each on the shared 2-core machine.
# A capped request of 80 messages of 49,000 characters, counted in one go, held every other
# call for 0.35 s in session 15's probe (and the tokenizer holds the GIL: a thread does not
# help). Every text is counted whole: one sampled in windows was undercounted 120 times
# over by a prompt crafted to be cheap where the windows fell.
PIECE_CHARS: Final = 16_384
# Tokens a cut inside a word (a text without a space for half a piece: Chinese, emoji) may
# move a count by, either way: BPE merges across the cut are lost, or start differently.
CUT_MARGIN: Final = 2
# Model name prefixes (after any "provider/") of o200k's models; the rest count with cl100k:
# gpt-4 and gpt-3.5 use it, and for other providers' models (no OpenAI tokenizer is theirs)
# it is the one that counts more: twice o200k's tokens on Chinese, as many on prose.
O200K_MODELS: Final = ("gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "gpt-oss",
                       "o1", "o3", "o4")  # fmt: skip
# Keys of a JSON schema whose string values OpenAI shows the model as they are (tools are
# rendered as a TypeScript namespace: names, descriptions as comments, enum values).
_SHOWN_KEYS: Final = frozenset({"name", "description"})
# Request fields billed as prompt tokens besides the messages.
PROMPT_FIELDS: Final = ("tools", "functions", "response_format")
# How an upstream counts prompt tokens (``UpstreamConfig.prompt_counter``): its model's OpenAI
# tokenizer, or the bundled simulator's rule (:func:`count_message_tokens`).
COUNTERS: Final = ("openai", "simulator")
# Image tokens OpenAI bills at most for one image part, for a reservation made before the
# call (the image's size is not known then). A high-detail image is scaled to fit 2,048 px,
# then to 768 px on its short side: at most 8 tiles of 512 px, plus a base; "low" detail is
# the base alone (gpt-4o: 85 and 170 a tile; o1, o3, gpt-4.5 and gpt-5 count less). gpt-4o-mini
# counts 33 times as many (priced to cost the same). The small newer models count 32-px
# patches, at most 1,536, times a multiplier, whatever the detail.
_IMAGE_TILES: Final = {"gpt-4o-mini": (2_833, 5_667)}
_IMAGE_DEFAULT_TILES: Final = (85, 170)
_IMAGE_PATCH_MULTIPLIERS: Final = {"gpt-4.1-mini": 1.62, "gpt-4.1-nano": 2.46,
                                   "gpt-5-mini": 1.62, "gpt-5-nano": 2.46, "o4-mini": 1.72}  # fmt: skip
_IMAGE_MAX_PATCHES: Final = 1_536
_IMAGE_MAX_TILES: Final = 8
_CUT = re.compile(r"(?<=\S) ")  # a space after a non-space: every pre-token starts there
_loading = threading.Lock()
_loaded: set[str] = set()


def encoding_for(model: str) -> str:
    """The OpenAI encoding a prompt for ``model`` is counted with."""
    name = model.rsplit("/", 1)[-1].lower()
    return "o200k_base" if name.startswith(O200K_MODELS) else "cl100k_base"


@functools.cache
def _tokenizer(encoding: str) -> Any:
    # The Rust tokenizer itself (bpe-openai's tiktoken-like wrapper adds Python rank tables
    # and a 200,000-token limit; its ``count`` builds no list): o200k 63 MB, cl100k 29 MB.
    return bpe_openai._bindings.tokenizer_for_encoding(encoding)


def load_tokenizer(encoding: str) -> None:
    """Load a tokenizer (40 ms; call it off the event loop the first time)."""
    if encoding not in _loaded:
        with _loading:
            _tokenizer(encoding)
            _loaded.add(encoding)


def tokenizer_loaded(encoding: str) -> bool:
    return encoding in _loaded


def _bpe_count(text: str, encoding: str) -> int:
    try:
        return int(_tokenizer(encoding).count(text))
    except UnicodeEncodeError:  # a lone surrogate: counted as the replacement character
        clean = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return int(_tokenizer(encoding).count(clean))


def _pieces(text: str, size: int) -> Iterator[tuple[str, bool]]:
    """``text`` cut into pieces of at most ``size`` characters, and whether each cut was
    forced. A piece ends before a space that follows a non-space, where OpenAI's
    pre-tokenizers always start a token (a space is only ever a token's first character,
    or in a token of whitespace alone), so the pieces' counts add up to the text's; failing
    one in the second half of the piece, the cut is where the piece is full."""
    start = 0
    while len(text) - start > size:
        end = start + size
        space = _CUT.search(text, start + size // 2, end)
        cut = space.start() if space else end
        yield text[start:cut], space is None
        start = cut
    yield text[start:], False


def text_token_counts(text: str, encoding: str, size: int = PIECE_CHARS) -> tuple[int, int, int]:
    """(OpenAI's tokens in ``encoding``, the simulator's tokens, forced cuts) of ``text``,
    counted piece by piece (:data:`PIECE_CHARS`): exact where no cut was forced, else within
    :data:`CUT_MARGIN` per forced cut (the simulator's count is at most one more per cut)."""
    return _drive(_text_steps(text, encoding, _Pace(), size))


# What reading one message costs, in characters counted: a body of 120,000 one-character
# messages held the event loop for 0.8 s between turns (session 17's probe).
MESSAGE_COST_CHARS = 64


class _Pace:
    """Characters counted (and messages read, at :data:`MESSAGE_COST_CHARS` each) since the
    event loop last had a turn."""

    def __init__(self) -> None:
        self.chars = 0

    def due(self, chars: int) -> bool:
        self.chars += chars
        if self.chars < PIECE_CHARS:
            return False
        self.chars = 0
        return True


_Steps = Generator[None, None, _T]


def _text_steps(
    text: str, encoding: str | None, pace: _Pace, size: int = PIECE_CHARS
) -> _Steps[tuple[int, int, int]]:
    """:func:`text_token_counts`, a piece at a time; OpenAI's count is 0 without an
    ``encoding`` (an upstream that bills by the simulator's rule needs none)."""
    if encoding is not None:
        load_tokenizer(encoding)
    tokens = pieces = forced = 0
    for piece, cut in _pieces(text, size):
        tokens += _bpe_count(piece, encoding) if encoding is not None else 0
        pieces += count_tokens(piece)
        forced += cut
        if pace.due(len(piece)):
            yield
    return tokens, pieces, forced


def _drive(steps: _Steps[_T]) -> _T:
    """Run a count to its end in one go."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return cast(_T, done.value)


async def _drive_async(steps: _Steps[_T]) -> _T:
    """Run a count, handing the event loop back after each piece."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return cast(_T, done.value)
        await asyncio.sleep(0)


def bpe_tokens(text: str, encoding: str = "cl100k_base") -> int:
    """OpenAI's tokens of ``text`` in ``encoding``, exact (the whole text in one go)."""
    load_tokenizer(encoding)
    return _bpe_count(text, encoding)


def image_tokens_max(model: str, detail: str = "auto") -> int:
    """The most prompt tokens OpenAI bills ``model`` for one image part of ``detail``."""
    name = model.rsplit("/", 1)[-1].lower()
    for prefix, multiplier in _IMAGE_PATCH_MULTIPLIERS.items():
        if name.startswith(prefix):
            return math.ceil(_IMAGE_MAX_PATCHES * multiplier)
    tiles = [t for prefix, t in _IMAGE_TILES.items() if name.startswith(prefix)]
    base, tile = tiles[0] if tiles else _IMAGE_DEFAULT_TILES
    return base if detail == "low" else base + _IMAGE_MAX_TILES * tile


def _image_details(message: dict[str, Any]) -> list[str]:
    """The ``detail`` of each image part of a (validated) message, "auto" when unsaid."""
    content = message.get("content")
    if not isinstance(content, list):
        return []
    details = []
    for part in content:
        if part.get("type") == "image_url":
            image = part.get("image_url")
            detail = image.get("detail") if isinstance(image, dict) else None
            details.append(detail if isinstance(detail, str) else "auto")
    return details


def count_tokens(text: str) -> int:
    """Deterministic token estimate: ceil(len / 4) per whitespace-separated chunk.

    Every chunk counts at least 1, the empty string counts 0, and the count is
    additive over whitespace joins, which is what lets the simulator generate text
    of an exact token count.
    """
    return sum((len(word) + 3) >> 2 for word in text.split())


class MessageProblem(ValueError):
    """A malformed chat message; ``path`` is where, inside the message: ``content[2].text``."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


def message_texts(message: Any) -> list[str]:
    """The texts of one chat message the model reads (and the provider bills): its content,
    its ``name``, and the names and arguments of earlier tool calls (``tool_calls``, the
    legacy ``function_call``); raises MessageProblem (a ValueError) on a malformed message."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise MessageProblem("role", "each message must be an object with a string 'role'")
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
        for index, part in enumerate(content):
            if not isinstance(part, dict):
                raise MessageProblem(f"content[{index}]", "content parts must be objects")
            if part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise MessageProblem(
                        f"content[{index}].text", "a text content part needs a string 'text'"
                    )
                texts.append(text)
        return texts
    raise MessageProblem("content", "content must be a string, a list of parts or null")


def count_message_tokens(messages: list[Any]) -> int:
    """Prompt tokens of chat ``messages`` exactly as the simulator reports them.

    :func:`count_tokens` of every text content (string, or the ``text`` of
    ``{"type": "text"}`` parts; other parts count 0), name and earlier tool call, plus
    :data:`MESSAGE_OVERHEAD_TOKENS` per message. Raises ValueError on malformed input.
    """
    return sum(
        MESSAGE_OVERHEAD_TOKENS + sum(count_tokens(t) for t in message_texts(m)) for m in messages
    )


def estimate_message_token_range(
    messages: list[Any],
    tokenize: str | None = None,
    fields: list[Any] | None = None,
    counter: str | None = None,
    model: str | None = None,
) -> tuple[int, int]:
    """(estimate, floor) of the prompt tokens of chat ``messages``, cheaply: validates like
    :func:`count_message_tokens`, then counts characters and words (measured on the shared
    2-core machine, busy: 2.4 µs for a one-line prompt, 150 µs for 18 KB of prose, where
    characters alone took 0.5 µs; a prompt that size takes the provider seconds).

    - estimate: the most of characters / 4 and the words (every whitespace-separated word
      is at least one token for BPE tokenizers and the simulator: 7,000 one-letter words
      are 7,000 tokens, not 3,500), and with ``tokenize`` (an encoding: :func:`encoding_for`
      the model), OpenAI's count (:func:`text_token_counts`: Chinese is about one token per
      character in cl100k, not a quarter) and a token per started four characters of each
      word (what the bundled simulator bills: more than OpenAI on prose of short words, a
      cap was crossed by 20 % in the sandbox without it; median 1.11 of o200k's count on
      GSM8K prompts). It may be high by a quarter or more (long words: 3,900 "word"s are
      3,904 tokens, estimated 4,880).
    - floor: what the prompt costs at least, for refusing a call on its prompt alone (a
      user under the cap must not be refused on an estimate that is too high): the words,
      or characters other than spaces / 8 if more (text without spaces). With ``tokenize``,
      the lesser of OpenAI's count and the simulator's: both are exact, and one of them
      bills the call (a lone call is served when its floor fits: a words-based floor let a
      Chinese prompt cross a cap by 90 % in the sandbox, 12 times over with gpt-4o).
    - ``fields`` (with ``tokenize``): the request's :data:`PROMPT_FIELDS`, billed as prompt
      too. Their JSON counts in the estimate; in the floor, the words OpenAI shows the model
      from them (:func:`shown_texts`): it renders tools as a TypeScript namespace, more
      compact than their JSON, but with every name, description and enum value in it.
    - ``model``: image parts count in the estimate at the most ``model`` may bill for them
      (:func:`image_tokens_max`; the size is not known before the call), in the floor not
      at all; not for an upstream that counts like the simulator, which bills none.
    - ``counter`` (with ``tokenize``): how the upstream counts, one of :data:`COUNTERS`.
      ``"openai"``: estimate and floor are its tokenizer's count; ``"simulator"``: the
      simulator's (its fields by :func:`count_field_tokens`); unset, either may bill the
      call, as above.

    Counted in one go; :func:`count_prompt` is the same count for the event loop.
    """
    return _drive(_range_steps(messages, tokenize, fields or [], counter, model))


async def count_prompt(
    messages: list[Any],
    encoding: str,
    fields: list[Any] | None = None,
    counter: str | None = None,
    model: str | None = None,
) -> tuple[int, int]:
    """:func:`estimate_message_token_range` with ``tokenize=encoding``, handing the event
    loop back after every :data:`PIECE_CHARS` characters counted; a tokenizer loads in a
    thread the first time."""
    if counter != "simulator" and not tokenizer_loaded(encoding):
        await asyncio.to_thread(load_tokenizer, encoding)
    return await _drive_async(_range_steps(messages, encoding, fields or [], counter, model))


def _range_steps(
    messages: list[Any],
    tokenize: str | None,
    fields: list[Any],
    counter: str | None = None,
    model: str | None = None,
) -> _Steps[tuple[int, int]]:
    if counter not in (None, *COUNTERS):
        raise ValueError(f"counter must be one of {COUNTERS} or None, not {counter!r}")
    pace = _Pace()
    texts_of = []
    for message in messages:  # all read (and checked) before any is counted
        texts_of.append(message_texts(message))
        if pace.due(MESSAGE_COST_CHARS):
            yield
    bpe_encoding = None if counter == "simulator" else tokenize
    estimate = floor = 0
    for texts in texts_of:
        if pace.due(MESSAGE_COST_CHARS):
            yield
        chars = sum(len(t) for t in texts)
        words = sum(len(t.split()) for t in texts)
        spaces = sum(t.count(" ") + t.count("\n") + t.count("\t") for t in texts)
        cheap, least = max((chars + 3) // 4, words), max(words, (chars - spaces) // 8)
        if tokenize:
            tokens = pieces = forced = 0
            for text in texts:
                bpe, simulated, cuts = yield from _text_steps(text, bpe_encoding, pace)
                tokens, pieces, forced = tokens + bpe, pieces + simulated, forced + cuts
            # exact where no cut was forced: what OpenAI or the simulator bills at least
            cheap = max(cheap, tokens + CUT_MARGIN * forced, pieces)
            least = max(0, min(tokens - CUT_MARGIN * forced, pieces - forced))
            if counter == "openai":
                cheap, least = tokens + CUT_MARGIN * forced, max(0, tokens - CUT_MARGIN * forced)
            elif counter == "simulator":
                cheap, least = pieces, pieces - forced
        estimate += MESSAGE_OVERHEAD_TOKENS + cheap
        floor += MESSAGE_OVERHEAD_TOKENS + least
    if model is not None and counter != "simulator":  # the simulator bills no image
        estimate += sum(
            image_tokens_max(model, detail) for m in messages for detail in _image_details(m)
        )
    if tokenize and fields:
        if counter == "simulator":
            billed = count_field_tokens(fields)
            return estimate + billed, floor + billed
        tokens, _, forced = yield from _text_steps(orjson.dumps(fields).decode(), tokenize, pace)
        estimate += tokens + CUT_MARGIN * forced
        shown, pieces, cuts = yield from _text_steps("\n".join(shown_texts(fields)), tokenize, pace)
        least = shown - CUT_MARGIN * cuts
        floor += max(0, least if counter == "openai" else min(least, pieces - cuts))
    return estimate, floor


def shown_texts(fields: Any) -> list[str]:
    """The strings of tool definitions or a JSON schema that the model is shown as they are:
    every ``name`` and ``description``, the names of ``properties`` and the strings of an
    ``enum`` (the JSON schema's own keywords and punctuation are not: OpenAI renders tools
    as TypeScript types)."""
    texts: list[str] = []
    stack = [fields]
    while stack:  # not recursive: a client may send a schema hundreds of levels deep
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(reversed(node))
        elif isinstance(node, dict):
            for key, value in node.items():
                if key in _SHOWN_KEYS and isinstance(value, str):
                    texts.append(value)
                elif key == "properties" and isinstance(value, dict):
                    texts.extend(str(name) for name in value)
                    stack.append(value)
                elif key == "enum" and isinstance(value, list):
                    texts.extend(v for v in value if isinstance(v, str))
                elif isinstance(value, dict | list):
                    stack.append(value)
    return texts


def count_field_tokens(fields: list[Any]) -> int:
    """Tokens the simulator bills for a request's :data:`PROMPT_FIELDS` (their compact JSON,
    by :func:`count_tokens`); 0 without any."""
    return count_tokens(orjson.dumps(fields).decode()) if fields else 0
