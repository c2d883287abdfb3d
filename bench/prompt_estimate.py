"""How close the dispatcher's prompt estimate is to what OpenAI's tokenizers count, and
what it costs per request, against the rule it replaced (characters / 4, or the words).

The estimate reserves room under budget caps before a call is sent: one that counts too
few tokens lets a call spend past the cap, one that counts far too many holds room (and
caps ``max_tokens``) for nothing. A call under a cap is now also counted with its model's
tokenizer (``tokenize``: o200k for gpt-4o, gpt-4.1, the o series; cl100k for gpt-4, gpt-3.5
and other providers' models); calls under no cap keep the old rule. Exact, here, is the
count of that tokenizer plus the per-message overhead both estimates add; each corpus is
measured for both (o200k first).

Corpora: real text first — the GSM8K prompts and the GPT-4 answers of the shared routing
data (``data/routing/gsm8k_responses.csv``), this repository's README and its Python
source — then text a newcomer may send that the old rule was never checked on: Chinese,
Japanese, Russian, Arabic, emoji, digits, base64 and JSON of numbers (each generated with a
fixed seed, 300 texts of 20 to 2,000 characters).

Reported per corpus and estimator: the share of texts estimated below the exact count
(a reservation too small), the worst and median estimate / exact, and the wall time per
text (``perf_counter_ns``; noisy on a shared machine, the process CPU time is printed too).

Then long prompts (:func:`long_prompts`): the count a capped call of 100 KB to 3.8 MB is
reserved on, by session 15's rule (a text over 49,152 characters sampled in 24 windows,
re-implemented here as the baseline) and counted whole now, against the tokenizer's count
of the whole text; and the longest the event loop waited while one such prompt was
counted (a task that only yields, timed between its turns), counted in one go against
:func:`count_prompt`, which hands the loop back between pieces.

Run ``python -m bench.prompt_estimate`` (``--json-out FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import functools
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bpe_openai

from app.pricing.tokens import (
    MESSAGE_OVERHEAD_TOKENS,
    bpe_tokens,
    count_prompt,
    estimate_message_token_range,
)

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "data" / "routing" / "gsm8k_responses.csv"


def old_estimate(messages: list[dict[str, str]]) -> int:
    """The rule before the tokenizer: characters / 4, or the words if there are more."""
    return sum(
        MESSAGE_OVERHEAD_TOKENS + max((len(m["content"]) + 3) // 4, len(m["content"].split()))
        for m in messages
    )


def new_estimate(encoding: str) -> Callable[[list[dict[str, str]]], int]:
    """What a call under a cap is reserved on now: its model's tokenizer counts too."""
    return lambda messages: estimate_message_token_range(messages, tokenize=encoding)[0]


def corpora(seed: int) -> dict[str, list[str]]:
    rng = random.Random(seed)
    with GSM8K.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    answers = [r[k] for r in rows for k in r if k.endswith("response") and "gpt-4" in k]
    source = sorted((ROOT / "app").rglob("*.py"))

    def drawn(alphabet: str, sep: str = "") -> list[str]:
        return [
            sep.join(rng.choice(alphabet) for _ in range(rng.randrange(20, 2000)))
            for _ in range(300)
        ]

    def words(vocabulary: list[str]) -> list[str]:
        return [
            " ".join(rng.choice(vocabulary) for _ in range(rng.randrange(5, 400)))
            for _ in range(300)
        ]

    return {
        "GSM8K prompts": [r["prompt"] for r in rows],
        "GSM8K GPT-4 answers": answers or [r["prompt"] for r in rows],
        "README (paragraphs)": [p for p in (ROOT / "README.md").read_text().split("\n\n") if p],
        "Python source (files)": [p.read_text() for p in source],
        "Chinese": drawn(
            "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生会"
        ),
        "Japanese": drawn("のにはをたがでてとしれさあいうえおかきくけこアイウエオカキクケコ日本語"),
        "Russian": words(["привет", "мир", "система", "бюджет", "запрос", "модель", "стоимость"]),
        "Arabic": words(["مرحبا", "العالم", "ميزانية", "طلب", "نموذج", "تكلفة"]),
        "emoji": drawn("🙂🚀👍🔥🎉💡✅📈"),
        "digits": drawn("0123456789"),
        "base64": [
            base64.b64encode(rng.randbytes(rng.randrange(15, 1500))).decode() for _ in range(300)
        ],
        "JSON numbers": [
            json.dumps([rng.random() * 10**6 for _ in range(rng.randrange(5, 200))])
            for _ in range(300)
        ],
    }


def exact_counter(encoding: str) -> Callable[[str], int]:
    tokenizer = bpe_openai.get_encoding(encoding)
    return lambda text: MESSAGE_OVERHEAD_TOKENS + len(tokenizer.encode_ordinary(text))


def measure(
    texts: list[str], estimate: Callable[[list[dict[str, str]]], int], exact: list[int]
) -> dict[str, Any]:
    ratios, wall, cpu = [], 0, 0
    for text, truth in zip(texts, exact, strict=True):
        messages = [{"role": "user", "content": text}]
        w, c = time.perf_counter_ns(), time.process_time_ns()
        value = estimate(messages)
        wall += time.perf_counter_ns() - w
        cpu += time.process_time_ns() - c
        ratios.append(value / truth)
    return {
        "under": sum(r < 1 for r in ratios) / len(ratios),
        "worst": min(ratios),
        "median": statistics.median(ratios),
        "highest": max(ratios),
        "us_per_text": wall / len(texts) / 1000,
        "cpu_us_per_text": cpu / len(texts) / 1000,
        "mean_chars": sum(map(len, texts)) / len(texts),
    }


def sampled_tokens(text: str, encoding: str, windows: int = 24, whole: int = 49_152) -> int:
    """Session 15's count of a long text: 24 windows of 2,048 characters, evenly spaced,
    scaled to the text's length (the baseline; texts up to 49,152 characters were whole)."""
    if len(text) <= whole:
        return bpe_tokens(text, encoding)
    size = whole // windows
    step = (len(text) - size) / (windows - 1)
    sample = [text[round(i * step) : round(i * step) + size] for i in range(windows)]
    return -(-sum(bpe_tokens(s, encoding) for s in sample) * len(text) // (size * windows))


def long_prompts(seed: int) -> dict[str, list[dict[str, str]]]:
    rng = random.Random(seed)
    crafted = list("🙂🚀👍" * 133_334)[:400_000]  # cheap "=" where the 24 windows fall
    step = (len(crafted) - 2_048) / 23
    for i in range(24):
        crafted[round(i * step) : round(i * step) + 2_048] = "=" * 2_048
    prose = " ".join(
        rng.choice(["invoice", "customer", "renewal", "quarter", "the", "a", "of"])
        for _ in range(150_000)
    )
    return {
        "crafted windows, 400 KB": [{"role": "user", "content": "".join(crafted)}],
        "prose, 1 message of 1.1 MB": [{"role": "user", "content": prose}],
        "Chinese, 80 messages of 48 KB": [
            {"role": "user", "content": "请为我们最大的客户起草续约邮件" * 3_200}
        ]
        * 80,
    }


async def loop_hold(count: Callable[[], Any]) -> tuple[float, float]:
    """(longest wait of the event loop, wall time) in ms while ``count()`` runs on it."""
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    start = time.perf_counter()
    result = count()
    if asyncio.iscoroutine(result):
        await result
    wall = time.perf_counter() - start
    await asyncio.sleep(0)
    task.cancel()
    return max(gaps) * 1000, wall * 1000


def measure_long(seed: int, encoding: str = "o200k_base") -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for name, messages in long_prompts(seed).items():
        texts = [m["content"] for m in messages]
        exact = sum(MESSAGE_OVERHEAD_TOKENS + bpe_tokens(t, encoding) for t in texts)
        sampled = MESSAGE_OVERHEAD_TOKENS * len(texts) + sampled_tokens("\n".join(texts), encoding)
        whole = estimate_message_token_range(messages, encoding)[0]
        held_before, wall_before = asyncio.run(
            loop_hold(functools.partial(estimate_message_token_range, messages, encoding))
        )
        held_now, wall_now = asyncio.run(
            loop_hold(functools.partial(count_prompt, messages, encoding))
        )
        results[name] = {
            "exact": exact, "sampled": sampled, "whole": whole,
            "held_ms_one_go": held_before, "held_ms_pieces": held_now,
            "wall_ms_one_go": wall_before, "wall_ms_pieces": wall_now,
        }  # fmt: skip
        print(
            f"{name:<32}{exact:>10}{sampled / exact:>9.3f}{whole / exact:>8.3f}"
            f"{held_before:>10.1f}{held_now:>8.1f}{wall_before:>9.0f}{wall_now:>7.0f}"
        )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    print(
        f"{'corpus':<24}{'tokenizer':>10}{'texts':>6}{'chars':>7}  "
        f"{'under old/new':>14}  {'worst old/new':>14}  {'median old/new':>15}  "
        f"{'highest old/new':>16}  {'µs old/new':>14}"
    )
    texts_of = corpora(args.seed)
    for encoding in ("o200k_base", "cl100k_base"):
        count, estimate = exact_counter(encoding), new_estimate(encoding)
        estimate([{"role": "user", "content": "load the tokenizer"}])  # not timed
        for name, texts in texts_of.items():
            exact = [count(t) for t in texts]
            old, new = measure(texts, old_estimate, exact), measure(texts, estimate, exact)
            results[f"{name} / {encoding}"] = {"texts": len(texts), "old": old, "new": new}
            print(
                f"{name:<24}{encoding[:6]:>10}{len(texts):>6}{old['mean_chars']:>7.0f}  "
                f"{old['under']:>6.0%} / {new['under']:>4.0%}  "
                f"{old['worst']:>6.2f} / {new['worst']:>5.2f}  "
                f"{old['median']:>7.2f} / {new['median']:>5.2f}  "
                f"{old['highest']:>8.2f} / {new['highest']:>5.2f}  "
                f"{old['us_per_text']:>6.1f} / {new['us_per_text']:>5.1f}"
            )
    print(
        f"\n{'long prompt (o200k)':<32}{'exact':>10}{'sampled':>9}{'whole':>8}"
        f"{'held ms':>10}{'now':>8}{'wall ms':>9}{'now':>7}"
    )
    results["long prompts"] = measure_long(args.seed)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
