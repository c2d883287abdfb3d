"""The request path's prompt estimate and floor against the simulator's own token count
(one token per started four characters of each word, the way BPE tokenizers give every
word at least one token)."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import bpe_openai
from hypothesis import given, settings
from hypothesis import strategies as st

from app.gateway.pipeline import ChatRequest, parse_chat_request
from app.pricing.tokens import (
    CUT_MARGIN,
    MESSAGE_OVERHEAD_TOKENS,
    count_field_tokens,
    count_message_tokens,
    count_tokens,
    encoding_for,
    estimate_message_token_range,
    text_token_counts,
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
    """The prompt tokens OpenAI's own tokenizers count, (o200k: gpt-4o, o-series; cl100k:
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


@settings(max_examples=200)
@given(st.lists(MIXED, min_size=1, max_size=3))
def test_the_estimate_covers_what_openai_tokenizers_count(texts: list[str]) -> None:
    messages = [{"role": "user", "content": text} for text in texts]
    for encoding, count in zip(("o200k_base", "cl100k_base"), openai_counts(messages), strict=True):
        estimate, floor = estimate_message_token_range(messages, tokenize=encoding)
        assert estimate >= max(count, count_message_tokens(messages))  # and the simulator's
        assert floor <= min(count, count_message_tokens(messages))


def test_each_model_counts_with_its_own_tokenizer() -> None:
    for model in ("gpt-4o", "gpt-4o-mini-2024-07-18", "openai/gpt-4.1-nano", "o3-mini", "gpt-5"):
        assert encoding_for(model) == "o200k_base", model
    for model in ("gpt-4", "gpt-4-turbo", "gpt-3.5-turbo", "claude-3-5-sonnet", "llama-3-70b"):
        assert encoding_for(model) == "cl100k_base", model


def test_chinese_after_pages_of_english_is_counted() -> None:
    text = "Summarise this. " * 1000 + "中文测试你好世界" * 3000  # English head, CJK tail
    messages = [{"role": "user", "content": text}]
    for encoding, count in zip(("o200k_base", "cl100k_base"), openai_counts(messages), strict=True):
        assert estimate_message_token_range(messages, encoding)[0] >= count


def test_a_long_prompt_is_counted_whole() -> None:
    """Session 15's second probe: a prompt over 49,152 characters was sampled in 24 windows
    at positions anyone can compute. 400k characters of emoji with ``=`` in those windows
    were counted as 6,431 tokens (767,993 in o200k) and served under a $0.01 cap. A capped
    prompt is now counted whole, whatever its length, and so is its floor."""
    size, windows = 2_048, 24  # the sampler's windows, where the filler was cheap
    length = 100_000  # (the reference tokenizer refuses more than 200,000 tokens)
    step = (length - size) / (windows - 1)
    chars = list("🙂🚀👍" * (length // 3 + 1))[:length]
    for i in range(windows):
        chars[round(i * step) : round(i * step) + size] = "=" * size
    text = "".join(chars)
    messages = [{"role": "user", "content": text}]
    o200k, cl100k = openai_counts(messages)
    assert o200k > 60_000  # the windows are 49,152 of the characters
    for encoding, count in (("o200k_base", o200k), ("cl100k_base", cl100k)):
        estimate, floor = estimate_message_token_range(messages, encoding)
        assert estimate >= count
        least = min(count, count_message_tokens(messages))
        assert 0.99 * least <= floor <= least  # (a margin at each cut between emoji)


@settings(max_examples=60)
@given(st.lists(MIXED, min_size=1, max_size=12), st.integers(min_value=8, max_value=200))
def test_a_text_counted_piece_by_piece_counts_as_counted_whole(parts: list[str], size: int) -> None:
    """Long texts are counted in pieces, so the event loop turns between them. A piece ends
    before a space that follows a non-space (OpenAI's pre-tokenizers start a token there),
    and the pieces' counts add up to the text's; a piece with no such space (Chinese,
    emoji) is cut where it must, and counted within a margin."""
    text = "".join(parts)
    for encoding in ("o200k_base", "cl100k_base"):
        whole = len(bpe_openai.get_encoding(encoding).encode_ordinary(text))
        tokens, pieces, forced = text_token_counts(text, encoding, size=size)
        if not forced:
            assert tokens == whole
        assert tokens - CUT_MARGIN * forced <= whole <= tokens + CUT_MARGIN * forced
        assert count_tokens(text) <= pieces <= count_tokens(text) + forced


async def loop_turns_while_counted(chat: ChatRequest) -> int:
    """How often another task ran while ``chat``'s prompt was counted (its tokenizer loaded
    first, off the loop)."""
    ticks = 0

    async def other_calls() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    await chat.tokenize_prompt()
    chat.prompt_tokenized = None
    other = asyncio.create_task(other_calls())
    try:
        before = ticks
        await chat.tokenize_prompt()
        return ticks - before
    finally:
        other.cancel()


def test_counting_a_long_capped_prompt_lets_other_calls_run() -> None:
    """Session 15's second probe: a capped request of 80 messages of 49,000 characters was
    counted on the event loop in one go, and held every other call for 0.35 s (2.2 s with
    eight at once). Counting now hands the loop back between pieces."""
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "请为我们最大的客户起草续约邮件" * 3_200}] * 80,
    }
    chat = parse_chat_request(body)
    # 3.8 million characters: a piece is 16,384 characters, so over 100 turns of the loop
    assert asyncio.run(loop_turns_while_counted(chat)) >= 100
    content = body["messages"][0]["content"]
    o200k = len(bpe_openai.get_encoding("o200k_base").encode_ordinary(content))
    assert chat.prompt_tokens_estimate is not None
    assert chat.prompt_tokens_estimate >= 80 * o200k


def test_many_small_messages_turn_the_loop_too() -> None:
    """Session 17's probe (F15): a 3.6 MB body of 120,000 one-character messages is only
    120,000 characters, so no piece was ever due and a capped call's count held the event
    loop for 0.8 s in one go. Reading a message counts as 64 characters of work."""
    chat = parse_chat_request(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "a"}] * 120_000}
    )
    # 2 x 120,000 messages x 64 / 16,384: about 940 turns
    assert asyncio.run(loop_turns_while_counted(chat)) >= 500


def test_english_prose_is_not_over_reserved() -> None:
    prose = (Path(__file__).parents[2] / "README.md").read_text()
    messages = [{"role": "user", "content": prose}]
    for encoding, count in zip(("o200k_base", "cl100k_base"), openai_counts(messages), strict=True):
        assert estimate_message_token_range(messages, encoding)[0] <= 1.3 * count


def test_without_the_tokenizer_the_estimate_is_the_cheap_rule() -> None:
    """Calls under no cap are not tokenized (``bench.gateway``: it tripled the added p99)."""
    text = "中文测试你好世界" * 100
    messages = [{"role": "user", "content": text}]
    assert estimate_message_token_range(messages) == (len(text) // 4 + 4, len(text) // 8 + 4)
    assert estimate_message_token_range(messages, "cl100k_base")[0] > 2 * (len(text) // 4)


def test_a_capped_calls_tool_definitions_count_as_prompt() -> None:
    """Tools and a response schema are billed as prompt tokens; 40 tool definitions are
    thousands of tokens that characters / 4 of the messages never saw."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": f"lookup_{i}",
                "description": "Look up the customer's invoices, payments and credit notes "
                "for the period and return them as a list.",
                "parameters": {
                    "type": "object",
                    "properties": {"customer_id": {"type": "string"}, "year": {"type": "integer"}},
                },
            },
        }
        for i in range(40)
    ]
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "tools": tools}
    chat = parse_chat_request(body)
    before = chat.prompt_tokens_estimate
    asyncio.run(chat.tokenize_prompt())
    schema = len(
        bpe_openai.get_encoding("o200k_base").encode_ordinary(
            json.dumps([tools], separators=(",", ":"))
        )
    )
    assert chat.prompt_tokens_estimate >= before + schema > 2_000
    # at least the words OpenAI renders from them, more compact than their JSON
    rendered = len(bpe_openai.get_encoding("o200k_base").encode_ordinary(openai_rendering(tools)))
    assert chat.prompt_tokens_floor is not None
    assert 5 + rendered // 2 <= chat.prompt_tokens_floor <= 5 + rendered
    assert chat.prompt_tokenized == "gpt-4o/None"
    again = chat.retarget("gpt-4")  # another tokenizer: counted again with it
    asyncio.run(again.tokenize_prompt())
    assert again.prompt_tokenized == "gpt-4/None"


def test_earlier_tool_calls_and_names_are_prompt_too() -> None:
    """Session 15's probe: 60 KB of earlier tool-call arguments in the history were reserved
    as 14 tokens (19,219 real); a message's ``name`` was not counted either. Both are sent
    to the model and billed; the simulator bills them too, so the sandbox shows it."""
    arguments = json.dumps(
        {"rows": [{"id": i, "note": f"invoice {i} paid late"} for i in range(1500)]}
    )
    messages = [
        {"role": "user", "content": "Reconcile the invoices.", "name": "accounts_payable_bot"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "load", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        {"role": "assistant", "function_call": {"name": "legacy", "arguments": arguments}},
    ]
    o200k = bpe_openai.get_encoding("o200k_base")
    billed = 2 * len(o200k.encode_ordinary(arguments))
    estimate, floor = estimate_message_token_range(messages, "o200k_base")
    assert estimate >= billed
    assert floor <= count_message_tokens(messages)
    # the cheap rule (uncapped calls) sees them too: characters / 4 of dense JSON, 23 before
    assert estimate_message_token_range(messages)[0] >= billed // 2
    assert count_message_tokens(messages) >= billed // 2  # and the simulator bills them


def test_a_capped_calls_tools_count_in_what_its_prompt_costs_at_least() -> None:
    """Session 15's probe: a 3.27 MB ``tools`` array (943,830 tokens, $2.36 at gpt-4o) was
    served under a $0.01 cap with one output token: the tools were in the reservation but
    not in the prompt's floor, which refuses a prompt that alone crosses the cap."""
    tools = [
        {"type": "function", "function": {"name": f"f{i}", "description": "x " * 400}}
        for i in range(50)
    ]
    chat = parse_chat_request(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "tools": tools}
    )
    asyncio.run(chat.tokenize_prompt())
    assert chat.prompt_tokens_floor is not None and chat.prompt_tokens_floor >= 10_000


def test_a_capped_prompt_of_short_words_covers_what_the_simulator_bills() -> None:
    """Session 15's probe: prose of five-letter words is one o200k token a word, two in the
    bundled simulator's count (one per started four characters), 1.5 by characters / 4: a
    cap was crossed by 20 % in the sandbox, past the 10 % the README promises."""
    messages = [{"role": "user", "content": "house water light green paper " * 500}]
    o200k, _ = openai_counts(messages)
    assert o200k < count_message_tokens(messages)
    estimate, floor = estimate_message_token_range(messages, "o200k_base")
    assert estimate >= count_message_tokens(messages)
    assert floor <= o200k


def test_a_capped_prompts_floor_is_what_openai_or_the_simulator_bills_at_least() -> None:
    """Session 15's second probe: the floor was the words (or characters / 8), so a lone
    call with a Chinese prompt whose estimate did not fit was served on it, and crossed a
    $0.01 cap by 90 % in the sandbox (12 times over with gpt-4o's real count)."""
    messages = [{"role": "user", "content": "请为我们最大的客户起草续约邮件" * 300}]
    o200k, _ = openai_counts(messages)
    _, floor = estimate_message_token_range(messages, "o200k_base")
    assert floor == min(o200k, count_message_tokens(messages))
    assert floor > 1.9 * estimate_message_token_range(messages)[1]  # the heuristic floor


def openai_rendering(tools: list[dict]) -> str:
    """Tools the way OpenAI shows them to the model (a TypeScript namespace: each function's
    description as a comment, its parameters as a type, their descriptions as comments;
    the JSON schema's own words are not there)."""

    def type_of(schema: dict, indent: str) -> str:
        if "enum" in schema:
            return " | ".join(json.dumps(v) for v in schema["enum"])
        if schema.get("type") == "object":
            lines = ["{"]
            for name, prop in schema.get("properties", {}).items():
                if "description" in prop:
                    lines.append(f"{indent}// {prop['description']}")
                optional = "" if name in schema.get("required", []) else "?"
                lines.append(f"{indent}{name}{optional}: {type_of(prop, indent)},")
            return "\n".join([*lines, "}"])
        if schema.get("type") == "array":
            return f"{type_of(schema.get('items', {}), indent)}[]"
        return str(schema.get("type", "any"))

    out = ["namespace functions {", ""]
    for tool in tools:
        function = tool["function"]
        if "description" in function:
            out.append(f"// {function['description']}")
        parameters = function.get("parameters")
        args = f"(_: {type_of(parameters, '')})" if parameters else "()"
        out += [f"type {function['name']} = {args} => any;", ""]
    return "\n".join([*out, "} // namespace functions"])


def tool_floor(tools: list[dict]) -> tuple[int, int]:
    chat = parse_chat_request(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "tools": tools}
    )
    asyncio.run(chat.tokenize_prompt())
    assert chat.prompt_tokens_floor is not None
    rendered = len(bpe_openai.get_encoding("o200k_base").encode_ordinary(openai_rendering(tools)))
    return chat.prompt_tokens_floor - (MESSAGE_OVERHEAD_TOKENS + 1), rendered


def test_tools_cost_at_least_the_words_openai_shows_the_model() -> None:
    """Session 15's second probe: tools counted half their JSON in the floor, so tools worth
    1.1 to 2.2 times the cap were served (1.65 times was). The floor is now the words OpenAI
    renders from them (names, descriptions, parameter names, enum values), which the model
    is shown and billed for whatever the JSON around them."""
    rng = random.Random(3)
    words = ["invoice", "customer", "balance", "quarter", "refund", "ledger", "amount", "due"]
    described = [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": " ".join(rng.choice(words) for _ in range(300)),
                "parameters": {
                    "type": "object",
                    "properties": {
                        "customer_id": {"type": "string", "description": "The customer."},
                        "period": {"type": "string", "enum": ["month", "quarter", "year"]},
                        "lines": {"type": "array", "items": {"type": "integer"}},
                    },
                    "required": ["customer_id"],
                },
            },
        }
        for i in range(40)
    ]
    floor, rendered = tool_floor(described)
    assert 0.9 * rendered <= floor <= rendered  # was about half
    bare = [  # mostly schema: OpenAI renders little of it, and so does the floor
        {
            "type": "function",
            "function": {
                "name": f"t{i}",
                "parameters": {
                    "type": "object",
                    "properties": {f"p{j}": {"type": "string"} for j in range(20)},
                },
            },
        }
        for i in range(30)
    ]
    floor, rendered = tool_floor(bare)
    assert floor <= rendered


def test_an_upstream_that_bills_by_the_simulators_rule_is_counted_by_it_exactly() -> None:
    """Session 15's second probe: with the floor the lesser of OpenAI's count and the
    simulator's, a prompt of short words the simulator bills at twice OpenAI's count was
    served under a cap it crossed by 90 %. The bundled simulator's upstream says how it
    counts, so its calls are reserved and refused on exactly that."""
    messages = [{"role": "user", "content": "hello world " * 2_000}]
    billed = count_message_tokens(messages)
    tools = [{"type": "function", "function": {"name": "f", "description": "due tax " * 50}}]
    for encoding in ("o200k_base", "cl100k_base"):
        assert estimate_message_token_range(messages, encoding)[1] <= billed // 2 + 4  # both
        exact = estimate_message_token_range(messages, encoding, counter="simulator")
        assert exact == (billed, billed)
        with_tools = estimate_message_token_range(messages, encoding, [tools], "simulator")
        assert with_tools == (billed + count_field_tokens([tools]),) * 2


def test_an_upstream_that_counts_like_openai_is_counted_by_its_tokenizer_exactly() -> None:
    messages = [{"role": "user", "content": "Renew the contract for 중요한 고객. " * 300}]
    o200k, cl100k = openai_counts(messages)
    for encoding, count in (("o200k_base", o200k), ("cl100k_base", cl100k)):
        assert estimate_message_token_range(messages, encoding, counter="openai") == (count, count)
        estimate, floor = estimate_message_token_range(messages, encoding)  # either counter
        assert floor <= count <= estimate


def test_images_under_a_cap_are_reserved_at_what_they_may_cost() -> None:
    """Image parts were not counted at all: a capped call with images was reserved for its
    text only, and an OpenAI upstream bills up to 1,445 tokens per high-detail image on
    gpt-4o (85 + 8 tiles of 170), 48,169 on gpt-4o-mini (its image tokens are priced to
    cost the same). The size is not known before the call, so the reservation takes the
    most; the floor takes none (a user under the cap is not refused on a guess), and the
    bundled simulator bills images nothing."""
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    low = {"type": "image_url", "image_url": {"url": "https://example.com/b.png", "detail": "low"}}
    text = {"type": "text", "text": "What is on these?"}
    messages = [{"role": "user", "content": [text, image, low, image]}]
    plain = [{"role": "user", "content": [text]}]
    for model, most, least in (("gpt-4o", 1_445, 85), ("gpt-4o-mini", 48_169, 2_833)):
        encoding = encoding_for(model)
        base_estimate, base_floor = estimate_message_token_range(plain, encoding)
        estimate, floor = estimate_message_token_range(messages, encoding, model=model)
        assert estimate == base_estimate + 2 * most + least
        assert floor == base_floor
        with_counter = estimate_message_token_range(
            messages, encoding, counter="simulator", model=model
        )
        assert with_counter == estimate_message_token_range(plain, encoding, counter="simulator")
