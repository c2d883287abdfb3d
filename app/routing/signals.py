"""What the router reads from a request: cheap, explainable signals and hashed text keys.

Owns turning a chat request body into a :class:`PromptView` (validated: a bad body is a
:class:`PromptError` naming the field), the hand-made signals with their cold-start
weights (:data:`PRIOR_WEIGHTS`, in log-odds of "the economy tier fails"), and the
hashed word and word-pair keys the learner counts outcomes against. It does not own
learning (:mod:`app.routing.model`) or decisions (:mod:`app.routing.router`).

Everything here is a pure function of the body. Text keys are CRC-32 hashes of
lower-cased words (digits read as 0, so a number counts by its length) and of adjacent
word pairs, so
checkpoints hold no prompt text and the same prompt gives the same keys in every
process (Python's own ``hash`` of a string differs between processes).
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import numpy as np

# re-exported: defined on its own so the dispatcher can catch it without importing numpy
from app.routing.errors import PromptError as PromptError

IMAGE_CHARS = 1000  # what an image counts for in the prompt's length (~ its tokens x 4)


@dataclass(frozen=True, slots=True)
class PromptView:
    """The parts of a chat request that routing looks at."""

    text: str  # the last user message (head and tail when long), the learner's text
    total_chars: int  # characters of every message's text, IMAGE_CHARS per image
    user_turns: int
    images: int
    max_tokens: int | None
    structured: bool  # tools or a response_format were asked for
    # characters of the last user message (all of it, IMAGE_CHARS per image): the question
    # asked, without the system prompt, history or documents around it (those are context)
    asked_chars: int = -1  # -1: the same as total_chars (a view built by hand)


def _content_text(content: Any, where: str) -> tuple[str, int]:
    """(text, images) of one message's content: a string or a list of typed parts."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        raise PromptError(where, "must be a string or a list of content parts")
    texts: list[str] = []
    images = 0
    for index, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise PromptError(f"{where}[{index}]", "must be an object with a 'type'")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise PromptError(f"{where}[{index}].text", "must be a string")
            texts.append(text)
        elif kind in ("image_url", "input_image", "image"):
            images += 1
    return "\n".join(texts), images


def view_of(body: Mapping[str, Any], max_chars: int = 800) -> PromptView:
    """Read a chat request body (OpenAI shape); raise :class:`PromptError` naming the field."""
    if not isinstance(body, Mapping):
        raise PromptError("body", "must be a JSON object with 'messages'")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages", "is required: a non-empty list of {role, content}")
    total = 0
    user_turns = 0
    images = 0
    last_user = ""
    asked = 0
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise PromptError(where, "must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise PromptError(f"{where}.role", "is required: a string such as 'user'")
        text, message_images = _content_text(message.get("content"), f"{where}.content")
        total += len(text) + IMAGE_CHARS * message_images
        images += message_images
        if role == "user":
            user_turns += 1
            last_user = text
            asked = len(text) + IMAGE_CHARS * message_images
    if not last_user and user_turns == 0:
        last_user = text  # no user message: read the last one
        asked = len(text) + IMAGE_CHARS * message_images
    if len(last_user) > max_chars:
        head = max_chars * 2 // 3
        last_user = last_user[:head] + "\n" + last_user[-(max_chars - head) :]
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
        raise PromptError("max_tokens", "must be an integer")
    structured = bool(body.get("tools") or body.get("functions") or body.get("response_format"))
    return PromptView(last_user, total, user_turns, images, max_tokens, structured, asked)


# -- signals ---------------------------------------------------------------------------------
# Cue words are looked up among the prompt's words (one tokenisation serves the signals and
# the text keys): a dozen regular expressions with alternations cost ~200 us per prompt.
_MATH_WORDS = frozenset(
    b"equation equations integral derivative probability matrix matrices theorem polynomial "
    b"logarithm modulo eigenvalue eigenvector vector vectors variance solve calculate compute "
    b"sqrt frac sum lim".split()
)
_REASONING_WORDS = frozenset(
    b"prove proof derive justify analyze analyse reasoning compare tradeoff tradeoffs "
    b"evaluate critique optimize optimise design plan why".split()
)
_REASONING_PAIRS = (
    (b"step", b"by"),
    (b"think", b"carefully"),
    (b"think", b"through"),
    (b"trade", b"off"),
)
_CONSTRAINT_WORDS = frozenset(b"must exactly only without format json".split())
_CONSTRAINT_PAIRS = ((b"at", b"least"), (b"at", b"most"), (b"no", b"more"), (b"do", b"not"))
_NEGATION_WORDS = frozenset(b"not except false incorrect never".split())
# Quantities stated relative to others: multiplicatives and comparatives ("half as many",
# "twice", "a third of", "3 more than"), each one a step a reader must chain.
_RELATION_WORDS = frozenset(
    b"half halves twice double doubled doubles triple tripled thrice third thirds quarter "
    b"quarters than".split()
)
_CODE_MARKS = (
    "```",
    "def ",
    "class ",
    "import ",
    "#include",
    "function",
    "=>",
    ";\n",
    "{\n",
    "\n    ",
)
_MATH_MARKS = ("=", "+", "^", "\\", "<", ">")
# Code marks searched for only when a character each needs is in the prompt (a search for
# one character is much cheaper than for several): the same count, less searching.
_CODE_MARKS_GATED = (("`", "```"), ("#", "#include"), (">", "=>"), (";", ";\n"), ("{", "{\n"))
_CODE_MARKS_ALWAYS = tuple(m for m in _CODE_MARKS if m not in dict(_CODE_MARKS_GATED).values())
# Every word a signal looks for (pairs' words included): a prompt's words are looked up in
# this set in one pass, and the signals read the (few) words found, not the prompt's whole
# word set.
_CUE_WORDS = frozenset(
    _MATH_WORDS
    | _REASONING_WORDS
    | _CONSTRAINT_WORDS
    | _NEGATION_WORDS
    | _RELATION_WORDS
    | {word for pair in (*_REASONING_PAIRS, *_CONSTRAINT_PAIRS) for word in pair}
)

_LENGTH_CENTER = math.log1p(300.0)
_OUTPUT_CENTER = math.log(512.0)
_CONTEXT_UNIT = 1000.0  # characters: context = ln(1 + other messages' characters / 1000)

SIGNAL_NAMES: tuple[str, ...] = (
    "length",
    "context",
    "depth",
    "code",
    "math",
    "reasoning",
    "relations",
    "constraints",
    "negation",
    "output_size",
    "structured",
    "images",
)

# Cold-start weights (log-odds that the economy tier fails, per unit of each signal): a
# judgment, not a fit. Only length was checked on data (a longer prompt fails more often
# on GSM8K); the learner corrects all of them from outcomes.
PRIOR_INTERCEPT = -1.4  # a 300-character plain question: P(fail) about 0.2
PRIOR_WEIGHTS: dict[str, float] = {
    "length": 0.35,
    "context": 0.1,
    "depth": 0.12,
    "code": 0.4,
    "math": 0.5,
    "reasoning": 0.6,
    "relations": 0.6,
    "constraints": 0.3,
    "negation": 0.15,
    "output_size": 0.15,
    "structured": 0.25,
    "images": 0.3,
}

# How a reason names each signal (and the learned evidence) for a person.
SIGNAL_LABELS: dict[str, str] = {
    "length": "prompt length",
    "context": "context around the question",
    "depth": "conversation depth",
    "code": "code",
    "math": "math",
    "reasoning": "explicit reasoning cues",
    "relations": "relative quantities",
    "constraints": "explicit constraints",
    "negation": "negations",
    "output_size": "requested max_tokens",
    "structured": "tools or structured output",
    "images": "images",
    "similar_outcomes": "outcomes of prompts with the same words",
}

_SYMBOLS = tuple("$%=+*/^{}<>?\\#@&|~`")
_SYMBOL_KEYS = tuple((symbol, zlib.crc32(symbol.encode())) for symbol in _SYMBOLS)
_PAIR_MULTIPLIER = np.uint64(0x9E3779B1)  # mixes a word pair's two hashes into one key


def _word_bytes() -> bytes:
    table = bytearray(range(256))
    for code in range(128):
        char = chr(code)
        if char.isalpha():
            table[code] = ord(char.lower())
        elif char.isdigit():
            table[code] = ord("0")
        else:
            table[code] = ord(" ")
    return bytes(table)


_WORD_BYTES = _word_bytes()


@dataclass(frozen=True, slots=True)
class Analysis:
    """A prompt's signals (explainable values) and hashed text keys."""

    signals: dict[str, float]
    keys: np.ndarray  # distinct hashed keys (intp), ascending


def _distinct(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct values (np.unique takes a slow hashing path on small arrays)."""
    keys.sort()
    if keys.size < 2:
        return keys
    return keys[np.concatenate(([True], keys[1:] != keys[:-1]))]


def _pairs(
    words: AbstractSet[bytes], tokens: list[bytes], wanted: tuple[tuple[bytes, bytes], ...]
) -> int:
    found = 0
    for first, second in wanted:
        if first in words and second in words:
            found += sum(1 for a, b in itertools.pairwise(tokens) if a == first and b == second)
    return found


def analyse(view: PromptView, bits: int) -> Analysis:
    """Signals (each 0 for a plain 300-character single-turn question) and text keys."""
    text = view.text
    # Bytes all the way and per-word work in C (map, numpy): in Python loops this was most
    # of the router's cost. The table lower-cases ASCII, reads digits as 0 (a number is keyed
    # by its digit count) and turns ASCII punctuation into spaces; UTF-8 bytes of other
    # scripts stay word characters.
    tokens = text.encode("utf-8", "replace").translate(_WORD_BYTES).split()
    # the prompt's cue words: what the signals read of its word set (one pass, few inserts)
    words = _CUE_WORDS.intersection(tokens)
    hashes = np.fromiter(map(zlib.crc32, tokens), dtype=np.uint64, count=len(tokens))
    mask = np.uint64((1 << bits) - 1)
    pairs = (hashes[:-1] * _PAIR_MULTIPLIER) ^ hashes[1:]
    symbols = [key for symbol, key in _SYMBOL_KEYS if symbol in text]
    all_keys = np.concatenate((hashes, pairs, np.asarray(symbols, dtype=np.uint64))) & mask
    keys = _distinct(all_keys.astype(np.intp))
    code_marks = sum(map(text.__contains__, _CODE_MARKS_ALWAYS)) + sum(
        1 for gate, mark in _CODE_MARKS_GATED if gate in text and mark in text
    )
    math_marks = sum(map(text.__contains__, _MATH_MARKS)) + len(words & _MATH_WORDS)
    reasoning = len(words & _REASONING_WORDS) + _pairs(words, tokens, _REASONING_PAIRS)
    # "trade-off" tokenises as trade, off
    constraints = len(words & _CONSTRAINT_WORDS) + _pairs(words, tokens, _CONSTRAINT_PAIRS)
    # counted with repeats: "half of ... then twice ..." chains two relations
    relations = sum(map(tokens.count, words & _RELATION_WORDS))
    max_tokens = view.max_tokens
    asked = view.total_chars if view.asked_chars < 0 else view.asked_chars
    values = {
        "length": math.log1p(asked) - _LENGTH_CENTER,
        "context": math.log1p(max(view.total_chars - asked, 0) / _CONTEXT_UNIT),
        "depth": float(min(max(view.user_turns - 1, 0), 10)),
        "code": 1.0 if code_marks >= 2 else 0.0,
        "math": min(math_marks, 5) / 5.0,
        "reasoning": min(reasoning, 3) / 3.0,
        "relations": min(relations, 4) / 4.0,
        "constraints": min(constraints, 4) / 4.0,
        "negation": 1.0 if words & _NEGATION_WORDS else 0.0,
        "output_size": (
            0.0
            if max_tokens is None
            else min(max(math.log(max_tokens) - _OUTPUT_CENTER, -2.0), 3.0)
        ),
        "structured": 1.0 if view.structured else 0.0,
        "images": min(view.images, 4) / 4.0,
    }
    return Analysis(values, keys)
