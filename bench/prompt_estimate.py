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

Run ``python -m bench.prompt_estimate`` (``--json-out FILE``).
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bpe_openai

from app.pricing.tokens import MESSAGE_OVERHEAD_TOKENS, estimate_message_token_range

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
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
