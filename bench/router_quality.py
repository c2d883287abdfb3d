"""Router quality on held-out prompts: RouteLLM's APGR and CPT(50 %) / CPT(80 %).

Data: ``data/routing/gsm8k_responses.csv`` (or ``--data``; RouteLLM's
file: a prompt, whether Mixtral-8x7B -- the economy tier -- answered it correctly, and
whether GPT-4 -- the premium tier -- did). For each of ``--splits`` seeded random 50/50
splits, every learning router learns the economy outcome (``failure`` = Mixtral wrong)
of the first half, in order, exactly as the live router learns outcomes, and then scores
the second half, which it never saw. Metrics are computed on the second half only
(:mod:`app.routing.evaluation`: deciles of the score as thresholds, trapezoid area).

Routers, all measured in the same run on the same splits:

| router | what it is |
|---|---|
| ``random`` | a uniform random score (seeded per split) |
| ``length`` | the prompt's length in characters: longer -> strong model |
| ``tfidf_lr`` | River ``feature_extraction.TFIDF() \\| linear_model.LogisticRegression()``, learned online |
| ``tollgate_prior`` | Tollgate's router before any outcome (its hand-set signal weights only) |
| ``tollgate`` | Tollgate's router (``app.routing.Router``, default settings) after learning |

Multi-subject proxies (``--dataset topics`` / ``header``). The issue's quality goal is judged on
multi-subject data this project does not have (MMLU-like: subjects differ a lot in how often the
economy model fails); GSM8K is one subject. Two **proxies** built from GSM8K itself, so that the
learner can be checked on prompts whose failure rate depends on their subject. They are proxies,
not that data: the prompts are still math word problems and the subject structure is made here.

- ``topics``: no header. Each prompt's subject is the first of six topic-word groups it uses
  (money, time, food, animals, school, distance; else "other"); each subject is resampled
  (seeded) to its own economy failure rate among 8 %, 16 %, ... 66 %, keeping real labels.
- ``header``: twelve made-up subjects, assigned at random, named in an MMLU-style first line
  ("The following is a question about botany."), each resampled to a failure rate between
  5 % and 65 %: one word of the prompt carries the subject.

For both, ``oracle_subject`` (knows each prompt's subject and learns its failure rate from the
training half) is the reference a subject-aware router could approach.

Also timed: the Tollgate router's ``route()`` per held-out prompt (CPU time, includes
reading the body, signals, hashed keys and scoring). The figure is noisy on a shared
machine; ``bench/savings_overhead.py`` measures it on realistic prompt sizes.

Run ``python -m bench.router_quality`` (``--splits N``, ``--json-out FILE``).
"""

from __future__ import annotations

import argparse
import csv
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from river import compose, feature_extraction, linear_model

from app.routing import Router, RoutingSettings
from app.routing.evaluation import quality_curve

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "routing" / "gsm8k_responses.csv"
WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG = "gpt-4-1106-preview"


@dataclass(frozen=True)
class Example:
    prompt: str
    weak_correct: bool
    strong_correct: bool


def load(path: Path) -> list[Example]:
    with path.open(newline="") as handle:
        return [
            Example(row["prompt"], row[WEAK] == "True", row[STRONG] == "True")
            for row in csv.DictReader(handle)
        ]


TOPICS: tuple[tuple[str, frozenset[str]], ...] = tuple(
    (name, frozenset(words.split()))
    for name, words in (
        ("money", "dollars dollar $ cost costs price paid pay sells sell earn earns buy bought "
         "spend spent profit"),
        ("time", "hours hour minutes minute days day week weeks month months years year"),
        ("food", "cookies apples pizza eggs cake cupcakes candy fruit eat ate pies oranges"),
        ("animals", "dogs dog cats cat chickens cows fish animals birds horses pets"),
        ("school", "students student class school teacher books book pages test grade"),
        ("distance", "miles mile km feet meters inches speed drive drives walk walks"),
    )
)  # fmt: skip
TOPIC_RATES = (0.08, 0.16, 0.26, 0.36, 0.46, 0.56, 0.66)
SUBJECTS = [
    "astronomy",
    "botany",
    "heraldry",
    "geology",
    "economics",
    "nutrition",
    "virology",
    "philosophy",
    "jurisprudence",
    "accounting",
    "sociology",
    "marketing",
]
HEADER = "The following is a question about "


def topic_of(prompt: str) -> str:
    words = set(prompt.lower().replace("$", " $ ").replace(".", " ").replace(",", " ").split())
    return next((name for name, group in TOPICS if words & group), "other")


def _resample(
    groups: dict[str, list[Example]], rates: dict[str, float], rng: random.Random
) -> list[Example]:
    """Each group subsampled (real labels kept) so that economy fails at its own rate."""
    out: list[Example] = []
    for name, examples in groups.items():
        rate = rates[name]
        failed = [e for e in examples if not e.weak_correct]
        passed = [e for e in examples if e.weak_correct]
        if len(failed) / len(examples) > rate:
            failed = rng.sample(failed, min(round(rate / (1 - rate) * len(passed)), len(failed)))
        else:
            passed = rng.sample(passed, min(round((1 - rate) / rate * len(failed)), len(passed)))
        out += failed + passed
    rng.shuffle(out)
    return out


def proxy_topics(data: list[Example], seed: int) -> list[Example]:
    rng = random.Random(f"topics-{seed}")
    groups: dict[str, list[Example]] = {}
    for example in data:
        groups.setdefault(topic_of(example.prompt), []).append(example)
    names = sorted(groups)
    return _resample(
        groups, dict(zip(names, rng.sample(TOPIC_RATES, len(names)), strict=True)), rng
    )


def proxy_header(data: list[Example], seed: int) -> list[Example]:
    rng = random.Random(f"header-{seed}")
    shuffled = data[:]
    rng.shuffle(shuffled)
    k = len(SUBJECTS)
    groups = {subject: shuffled[i::k] for i, subject in enumerate(SUBJECTS)}
    rates = {s: 0.05 + 0.6 * i / (k - 1) for i, s in enumerate(rng.sample(SUBJECTS, k))}
    subject_of = {id(e): s for s, examples in groups.items() for e in examples}
    return [
        Example(f"{HEADER}{subject_of[id(e)]}.\n\n{e.prompt}", e.weak_correct, e.strong_correct)
        for e in _resample(groups, rates, rng)
    ]


PROXIES: dict[str, Callable[[list[Example], int], list[Example]]] = {
    "topics": proxy_topics,
    "header": proxy_header,
}


def _body(prompt: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}]}


class RouterUnderTest:
    name = ""

    def learn(self, example: Example) -> None:
        """Learn the economy outcome of one training example."""

    def score(self, prompt: str) -> float:
        raise NotImplementedError


class RandomRouter(RouterUnderTest):
    name = "random"

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def score(self, prompt: str) -> float:
        return self.rng.random()


class LengthRouter(RouterUnderTest):
    name = "length"

    def score(self, prompt: str) -> float:
        return float(len(prompt))


class TfidfRouter(RouterUnderTest):
    name = "tfidf_lr"

    def __init__(self) -> None:
        self.model = compose.Pipeline(feature_extraction.TFIDF(), linear_model.LogisticRegression())

    def learn(self, example: Example) -> None:
        self.model.learn_one(example.prompt, not example.weak_correct)

    def score(self, prompt: str) -> float:
        return float(self.model.predict_proba_one(prompt).get(True, 0.0))


class OracleSubjectRouter(RouterUnderTest):
    """Reference on the proxies: the subject's failure rate in the training half."""

    name = "oracle_subject"

    def __init__(self) -> None:
        self.counts: dict[str, tuple[int, int]] = {}

    @staticmethod
    def subject(prompt: str) -> str:
        if prompt.startswith(HEADER):
            return prompt[len(HEADER) :].split(".", 1)[0]
        return topic_of(prompt)

    def learn(self, example: Example) -> None:
        failed, seen = self.counts.get(self.subject(example.prompt), (0, 0))
        self.counts[self.subject(example.prompt)] = (failed + (not example.weak_correct), seen + 1)

    def score(self, prompt: str) -> float:
        failed, seen = self.counts.get(self.subject(prompt), (0, 0))
        return (failed + 1) / (seen + 2) + len(prompt) * 1e-7  # length breaks ties


class TollgateRouter(RouterUnderTest):
    def __init__(self, learn: bool) -> None:
        self.name = "tollgate" if learn else "tollgate_prior"
        self.router = Router(RoutingSettings())
        self.learning = learn
        self.cpu_seconds = 0.0
        self.scored = 0

    def learn(self, example: Example) -> None:
        if self.learning:
            outcome = "success" if example.weak_correct else "failure"
            self.router.learn(_body(example.prompt), "economy", outcome)

    def score(self, prompt: str) -> float:
        body = {**_body(prompt), "model": "auto"}
        started = time.process_time()
        decision = self.router.route(body)
        self.cpu_seconds += time.process_time() - started
        self.scored += 1
        assert decision.score is not None
        return decision.score


def evaluate(
    make: Callable[[int], RouterUnderTest],
    data: list[Example],
    seeds: Sequence[int],
    dataset: str = "gsm8k",
) -> dict[str, Any]:
    apgr, cpt50, cpt80 = [], [], []
    timing: list[float] = []
    name = ""
    for seed in seeds:
        shuffled = PROXIES[dataset](data, seed) if dataset in PROXIES else data[:]
        random.Random(seed).shuffle(shuffled)
        half = len(shuffled) // 2
        train, test = shuffled[:half], shuffled[half:]
        router = make(seed)
        name = router.name
        for example in train:
            router.learn(example)
        scores = [router.score(example.prompt) for example in test]
        curve = quality_curve(
            scores, [e.weak_correct for e in test], [e.strong_correct for e in test]
        )
        apgr.append(curve.apgr)
        cpt50.append(curve.cpt(0.5))
        cpt80.append(curve.cpt(0.8))
        if isinstance(router, TollgateRouter) and router.scored:
            timing.append(router.cpu_seconds / router.scored * 1e6)
    result: dict[str, Any] = {
        "router": name,
        "apgr_mean": statistics.mean(apgr),
        "apgr_std": statistics.stdev(apgr) if len(apgr) > 1 else 0.0,
        "apgr_min": min(apgr),
        "cpt50_mean": statistics.mean(cpt50),
        "cpt80_mean": statistics.mean(cpt80),
        "apgr_per_split": apgr,
    }
    if timing:
        result["route_cpu_us_mean"] = statistics.mean(timing)
    return result


QUALITY_TARGETS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.9)


def padded_body(prompt: str, texts: Sequence[str], rng: random.Random, size: int) -> dict[str, Any]:
    """The prompt as the user message after a system message of other prompts' text that
    brings the body to ``size`` characters: how ``bench/savings.py`` pads GSM8K questions
    to the Azure trace's sizes (its ``_context``)."""
    from bench.savings import _context  # bench.savings imports this module

    messages = []
    context_chars = max(0, size - len(prompt))
    if context_chars:
        messages.append({"role": "system", "content": _context(texts, rng, context_chars)})
    messages.append({"role": "user", "content": prompt})
    return {"model": "auto", "messages": messages}


def calibration(data: list[Example], seeds: Sequence[int], size: int) -> dict[str, Any]:
    """Economy share per ``quality_target`` on prompts padded to ``size`` characters.

    Per split, the Tollgate router learns the first half's economy outcomes of padded prompts
    (what it would see on real traffic) and routes the second half, padded as well; the
    prior-only router routes the same padded prompts. Also the APGR of those padded scores.
    """
    texts = [e.prompt for e in data]
    shares: dict[str, dict[float, list[float]]] = {
        name: {q: [] for q in QUALITY_TARGETS} for name in ("tollgate_prior", "tollgate")
    }
    apgr: list[float] = []
    for seed in seeds:
        shuffled = data[:]
        random.Random(seed).shuffle(shuffled)
        half = len(shuffled) // 2
        train, test = shuffled[:half], shuffled[half:]
        rng = random.Random(f"pad-{seed}")
        prior, learned = Router(RoutingSettings()), Router(RoutingSettings())
        for example in train:
            outcome = "success" if example.weak_correct else "failure"
            learned.learn(padded_body(example.prompt, texts, rng, size), "economy", outcome)
        bodies = [padded_body(e.prompt, texts, rng, size) for e in test]
        for name, router in (("tollgate_prior", prior), ("tollgate", learned)):
            scores = [router.route(body).score or 0.0 for body in bodies]
            for q in QUALITY_TARGETS:
                shares[name][q].append(sum(1.0 - s >= q for s in scores) / len(scores))
            if name == "tollgate":
                weak = [e.weak_correct for e in test]
                apgr.append(quality_curve(scores, weak, [e.strong_correct for e in test]).apgr)
    return {
        "padded_to_chars": size,
        "economy_share": {
            name: {str(q): statistics.mean(v) for q, v in by_q.items()}
            for name, by_q in shares.items()
        },
        "padded_apgr_mean": statistics.mean(apgr),
        "padded_apgr_std": statistics.stdev(apgr) if len(apgr) > 1 else 0.0,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = load(Path(args.data))
    seeds = list(range(args.seed, args.seed + args.splits))
    makers: list[Callable[[int], RouterUnderTest]] = [
        RandomRouter,
        lambda seed: LengthRouter(),
        lambda seed: TfidfRouter(),
        lambda seed: TollgateRouter(learn=False),
        lambda seed: TollgateRouter(learn=True),
    ]
    if args.dataset in PROXIES:
        makers.append(lambda seed: OracleSubjectRouter())
    results = []
    for make in makers:
        started = time.perf_counter()
        result = evaluate(make, data, seeds, args.dataset)
        result["wall_s"] = round(time.perf_counter() - started, 1)
        results.append(result)
        print(f"  {result['router']}: APGR {result['apgr_mean']:.3f}", file=sys.stderr)
    by_name = {r["router"]: r for r in results}
    for name in ("tollgate", "tollgate_prior", "tfidf_lr"):
        ours, length = by_name[name]["apgr_per_split"], by_name["length"]["apgr_per_split"]
        differences = [a - b for a, b in zip(ours, length, strict=True)]
        by_name[name]["vs_length"] = {
            "mean_difference": statistics.mean(differences),
            "std_difference": statistics.stdev(differences) if len(differences) > 1 else 0.0,
            "splits_won": sum(d > 0 for d in differences),
        }
    padded = (
        calibration(data, seeds, args.padded_chars)
        if args.padded_chars and args.dataset == "gsm8k"
        else None
    )
    weak = sum(e.weak_correct for e in data) / len(data)
    strong = sum(e.strong_correct for e in data) / len(data)
    return {
        "data": str(args.data),
        "dataset": args.dataset,
        "prompts": len(PROXIES[args.dataset](data, seeds[0]))
        if args.dataset in PROXIES
        else len(data),
        "weak_accuracy": weak,
        "strong_accuracy": strong,
        "splits": len(seeds),
        "seeds": seeds,
        "machine": {"python": platform.python_version(), "cpus": _cpus()},
        "results": results,
        "padded": padded,
    }


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['prompts']} prompts ({Path(report['data']).name}, {report['dataset']}), "
        f"{report['splits']} random "
        f"50/50 splits: learn the first half's economy outcomes, score the second half",
        "",
        "| router | APGR mean ± std (min) | vs length, same split: mean ± std (won) "
        "| CPT(50 %) | CPT(80 %) | route() CPU µs |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for r in report["results"]:
        timing = f"{r['route_cpu_us_mean']:.0f}" if "route_cpu_us_mean" in r else ""
        paired = r.get("vs_length")
        versus = (
            f"{paired['mean_difference']:+.3f} ± {paired['std_difference']:.3f} "
            f"({paired['splits_won']}/{report['splits']})"
            if paired
            else ""
        )
        lines.append(
            f"| {r['router']} | {r['apgr_mean']:.3f} ± {r['apgr_std']:.3f} ({r['apgr_min']:.3f}) "
            f"| {versus} | {r['cpt50_mean']:.1%} | {r['cpt80_mean']:.1%} | {timing} |"
        )
    padded = report.get("padded")
    if padded:
        lines += [
            "",
            f"Economy share by quality_target, prompts padded to {padded['padded_to_chars']:,} "
            f"characters (learned on padded prompts; APGR of these scores "
            f"{padded['padded_apgr_mean']:.3f} ± {padded['padded_apgr_std']:.3f}):",
            "",
            "| router | " + " | ".join(str(q) for q in QUALITY_TARGETS) + " |",
            "|---|" + "--:|" * len(QUALITY_TARGETS),
        ]
        for name, by_q in padded["economy_share"].items():
            cells = " | ".join(f"{by_q[str(q)]:.1%}" for q in QUALITY_TARGETS)
            lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="RouteLLM responses CSV")
    parser.add_argument(
        "--dataset", choices=("gsm8k", *PROXIES), default="gsm8k",
        help="gsm8k, or a multi-subject proxy built from it (topics, header; see above)",
    )  # fmt: skip
    parser.add_argument("--splits", type=int, default=10, help="random 50/50 splits")
    parser.add_argument("--seed", type=int, default=0, help="first split's seed")
    parser.add_argument(
        "--padded-chars", type=int, default=4096,
        help="also route prompts padded to this size per quality_target (0: skip)",
    )  # fmt: skip
    parser.add_argument("--json-out", default=None, help="also write the JSON figures here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(table(report))
    document = orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()
    print(document)
    if args.json_out:
        Path(args.json_out).write_text(document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
