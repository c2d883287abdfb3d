"""The router learns from outcomes, per feature, and its checkpoint restores it exactly."""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path
from typing import Any

import pytest

from app.routing import FailureModel, Router, RouterCheckpointError, RoutingSettings
from app.routing.model import _SNAPSHOT_MAGIC, _prior_parts, learned_weight
from app.routing.scoring import GATE_DEFAULT
from app.routing.signals import PRIOR_INTERCEPT
from bench.router_quality import SUBJECTS  # the header proxy's twelve made-up subjects

DATA = Path(__file__).resolve().parents[2] / "data" / "routing" / "gsm8k_responses.csv"
WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"


def _body(text: str) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": text}]}


def _gsm8k() -> list[tuple[str, bool]]:
    with DATA.open(newline="") as handle:
        return [(row["prompt"], row[WEAK] != "True") for row in csv.DictReader(handle)]


TOPIC_HARD = "Question about tensor calculus on manifolds: "
TOPIC_EASY = "Question about pet grooming tips: "


def _topic_stream(n: int, seed: int = 3) -> list[tuple[str, bool]]:
    """Two topics over real prompts: economy fails on the first, succeeds on the second."""
    rng = random.Random(seed)
    prompts = [p for p, _ in _gsm8k()]
    stream = []
    for _ in range(n):
        hard = rng.random() < 0.5
        stream.append(((TOPIC_HARD if hard else TOPIC_EASY) + rng.choice(prompts), hard))
    return stream


def _score(router: Router, text: str, feature: str | None = None) -> float:
    score = router.route(_body(text), feature).score
    assert score is not None
    return score


def test_failures_raise_and_successes_lower_the_score_of_similar_prompts() -> None:
    router = Router(RoutingSettings())
    unseen_hard = TOPIC_HARD + "A train leaves at 3 pm at 60 km/h; when does it arrive?"
    unseen_easy = TOPIC_EASY + "A train leaves at 3 pm at 60 km/h; when does it arrive?"
    before_hard, before_easy = _score(router, unseen_hard), _score(router, unseen_easy)
    for text, failed in _topic_stream(300):
        assert router.learn(_body(text), "economy", "failure" if failed else "success")
    assert _score(router, unseen_hard) > before_hard + 0.1
    assert _score(router, unseen_easy) < before_easy - 0.05
    assert _score(router, unseen_hard) > _score(router, unseen_easy) + 0.3
    assert "outcomes of prompts with the same words" in router.route(_body(unseen_hard)).reason


def test_only_economy_outcomes_teach_and_scoring_does_not_change_the_model() -> None:
    router = Router(RoutingSettings())
    text = "Summarise the quarterly report."
    before = router.snapshot()
    assert not router.learn(_body(text), "premium", "failure")
    assert not router.learn(_body(text), "standard", "success")
    for _ in range(5):
        router.route(_body(text))
    assert router.snapshot() == before
    assert router.learn(_body(text), "economy", "failure")
    assert router.snapshot() != before
    with pytest.raises(ValueError):
        router.learn(_body(text), "economy", "meh")  # type: ignore[arg-type]


def test_a_feature_learns_its_own_difficulty() -> None:
    router = Router(RoutingSettings())
    prompts = [p for p, _ in _gsm8k()[:400]]
    for text in prompts[:200]:
        router.learn(_body(text), "economy", "failure", feature="hard-feature")
    for text in prompts[200:400]:
        router.learn(_body(text), "economy", "success", feature="easy-feature")
    probe = "How many apples are left if Tom eats 3 of his 10 apples?"
    assert _score(router, probe, "hard-feature") > _score(router, probe, "easy-feature") + 0.2


def test_features_beyond_the_cap_share_the_global_model() -> None:
    model = FailureModel(max_feature_models=2)
    router = Router(RoutingSettings(), model)
    for feature in ("a", "b", "c", "d"):
        router.learn(_body("hello"), "economy", "success", feature)
    assert list(model.feature_learners) == ["a", "b"]
    assert model.outcomes_learned == 4


def test_checkpoint_round_trip_gives_identical_scores_and_learning() -> None:
    data = _gsm8k()
    router = Router(RoutingSettings())
    for text, failed in data[:300]:
        router.learn(_body(text), "economy", "failure" if failed else "success", "f")
    restored = Router.restore(RoutingSettings(), router.snapshot())
    held_out = [text for text, _ in data[300:400]]
    for text in held_out:
        for feature in (None, "f", "unknown"):
            assert router.route(_body(text), feature) == restored.route(_body(text), feature)
    # both keep learning the same way
    for text, failed in data[400:450]:
        for r in (router, restored):
            r.learn(_body(text), "economy", "failure" if failed else "success", "f")
    assert [_score(router, t, "f") for t in held_out] == [
        _score(restored, t, "f") for t in held_out
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"garbage", "not a router-model checkpoint"),
        (_SNAPSHOT_MAGIC + b"\x00\x00\x00\x09" + b"x", "version 9"),
        (_SNAPSHOT_MAGIC + b"\x00\x00\x00\x01" + b"x", "version 1 is not 2"),  # before the stack
        (_SNAPSHOT_MAGIC + b"\x00\x00\x00\x02" + b"not a pickle", "not readable"),
    ],
)
def test_a_bad_checkpoint_is_refused_with_what_to_do(data: bytes, message: str) -> None:
    with pytest.raises(RouterCheckpointError, match=message) as error:
        FailureModel.restore(data)
    assert "delete it" in str(error.value)


def test_restore_applies_new_thresholds_and_warmup_but_keeps_the_hashing() -> None:
    router = Router(RoutingSettings())
    for text, failed in _gsm8k()[:50]:
        router.learn(_body(text), "economy", "failure" if failed else "success")
    changed = RoutingSettings(warmup_outcomes=5, quality_target=0.99, hash_bits=12)
    restored = Router.restore(changed, router.snapshot())
    assert restored.model.warmup_outcomes == 5
    assert restored.model.hash_bits == 18  # learned with 18 bits: keys must keep meaning
    assert restored.route(_body("What is 2 + 2?")).tier == "standard"  # quality_target 0.99


def test_the_explained_parts_add_up_to_the_score() -> None:
    """The reason's numbers are the score's own log-odds parts, not a separate story."""
    import math

    router = Router(RoutingSettings())
    for text, failed in _gsm8k()[:200]:
        router.learn(_body(text), "economy", "failure" if failed else "success", "f")
    for text, _ in _gsm8k()[200:230]:
        for feature in (None, "f"):
            score = router.model.score(router.features(_body(text)), feature)
            assert math.isclose(sum(score.parts), math.log(score.value / (1 - score.value)),
                                abs_tol=1e-9)  # fmt: skip


def _padded(text: str, rng: random.Random, prompts: list[str]) -> dict[str, Any]:
    context = " ".join(rng.choice(prompts) for _ in range(20))[:4000]
    return {"model": "auto", "messages": [
        {"role": "system", "content": context}, {"role": "user", "content": text}
    ]}  # fmt: skip


@pytest.mark.parametrize(
    ("far", "farther"),
    [
        (_body("word " * 20_000), _body("word " * 200_000)),  # far longer than any learned
        (_body("x "), _body("x")),  # far shorter (the same words)
    ],
)
def test_a_prompt_far_outside_what_was_learned_moves_the_learned_part_a_bounded_amount(
    far: dict[str, Any], farther: dict[str, Any]
) -> None:
    """Each standardised input counts for at most Z_CLIP deviations (learning and scoring):
    a feature that starts sending prompts unlike those learned must not swing every score
    towards 0 or 1 by a weight times dozens of deviations."""
    router = Router(RoutingSettings())
    for text, failed in _gsm8k()[:300]:
        router.learn(_body(text), "economy", "failure" if failed else "success")
    learner = router.model.global_learner
    logits = []
    for body in (far, farther):
        features = router.features(body)
        prior_parts = _prior_parts(features.signals)
        inputs = learner.inputs(features, PRIOR_INTERCEPT + sum(prior_parts))
        logit, parts = learner.contributions(inputs, prior_parts)
        assert math.isclose(sum(parts), logit, abs_tol=1e-9)  # the reason still adds up
        score = router.model.score(features)
        assert math.isclose(sum(score.parts), math.log(score.value / (1 - score.value)),
                            abs_tol=1e-9)  # fmt: skip
        logits.append(logit)
    assert logits[0] == pytest.approx(logits[1], abs=1e-9)


def test_learning_on_padded_prompts_scores_them_like_bare_ones() -> None:
    """A router that learned from 4 KB bodies (a question after padding) ranks and scores
    their questions as one that learned the bare questions: padding is not difficulty."""
    rng = random.Random(5)
    data = _gsm8k()
    prompts = [p for p, _ in data]
    bare, padded = Router(RoutingSettings()), Router(RoutingSettings())
    for text, failed in data[:500]:
        outcome = "failure" if failed else "success"
        bare.learn(_body(text), "economy", outcome)
        padded.learn(_padded(text, rng, prompts), "economy", outcome)
    gaps = [
        abs(_score(bare, text) - (padded.route(_padded(text, rng, prompts)).score or 0.0))
        for text, _ in data[500:600]
    ]
    assert max(gaps) < 0.1


def _subject_text(subject: str, prompt: str) -> str:
    return f"The following is a question about {subject}.\n\n{prompt}"


def test_a_subject_named_by_one_word_in_a_long_prompt_is_learned() -> None:
    """MMLU-like traffic: twelve subjects, each named once in a header above a real GSM8K
    question, economy failing 5 % to 65 % of the time by subject. One word among about fifty
    carries the signal; after 600 outcomes, unseen questions of the three hardest subjects
    must score clearly above the same questions under the three easiest. (The router without
    the significant-word evidence separated them by -0.01 here: the subject word drowned in
    the mean over the other words. The learned part is trusted only once it ranks better
    than the prior on recent outcomes: 0.086 at 400 outcomes, 0.20 at 600; without that
    check, more than 0.1 at 400.)"""
    rate = {subject: 0.05 + 0.6 * i / 11 for i, subject in enumerate(SUBJECTS)}
    rng = random.Random(0)
    prompts = [p for p, _ in _gsm8k()]
    router = Router(RoutingSettings())
    for prompt in prompts[:600]:
        subject = rng.choice(SUBJECTS)
        failed = rng.random() < rate[subject]
        router.learn(
            _body(_subject_text(subject, prompt)), "economy", "failure" if failed else "success"
        )
    held_out = prompts[1000:1060]

    def mean_score(subjects: list[str]) -> float:
        scores = [_score(router, _subject_text(s, p)) for s in subjects for p in held_out]
        return sum(scores) / len(scores)

    assert mean_score(SUBJECTS[-3:]) > mean_score(SUBJECTS[:3]) + 0.1


def _apgr_on_held_out_gsm8k(seed: int, learn: int | None = None) -> tuple[float, float, float]:
    """(learned router, its prior, prompt length) APGR on one seeded 50/50 split of GSM8K:
    the router learns the first half's economy outcomes in order (only the first ``learn``
    of them if given) and scores the second half, as ``bench.router_quality`` does."""
    from app.routing.evaluation import quality_curve
    from bench.router_quality import DEFAULT_DATA, load

    data = load(DEFAULT_DATA)
    random.Random(seed).shuffle(data)
    train, test = data[: len(data) // 2], data[len(data) // 2 :]
    prior, learned = Router(RoutingSettings()), Router(RoutingSettings())
    for example in train[:learn]:
        outcome = "success" if example.weak_correct else "failure"
        learned.learn(_body(example.prompt), "economy", outcome)
    weak = [e.weak_correct for e in test]
    strong = [e.strong_correct for e in test]

    def apgr(scores: list[float]) -> float:
        return quality_curve(scores, weak, strong).apgr

    return (
        apgr([_score(learned, e.prompt) for e in test]),
        apgr([_score(prior, e.prompt) for e in test]),
        apgr([float(len(e.prompt)) for e in test]),
    )


def test_on_held_out_gsm8k_the_learned_router_beats_length_and_keeps_its_prior() -> None:
    """A real held-out measurement on data we did not make (RouteLLM's GSM8K responses),
    on five development splits (seeds 0-4; the documented figures use other seeds). The
    learned router must beat the prompt-length baseline clearly (the issue's floor), and
    learning must not make it worse than its own prior: on single-subject traffic, where no
    word predicts failure, a learner that trusts noisy word evidence over a good prior loses
    to it (the router of main: +0.000 over length on seeds 0-49)."""
    results = [_apgr_on_held_out_gsm8k(seed) for seed in range(5)]
    over_length = [learned - length for learned, _, length in results]
    over_prior = [learned - prior for learned, prior, _ in results]
    assert sum(over_length) / 5 >= 0.02
    assert sum(d > 0 for d in over_length) >= 4
    assert sum(over_prior) / 5 >= -0.005


@pytest.mark.parametrize("outcomes", [100, 200])
def test_a_few_hundred_outcomes_do_not_make_the_router_worse_than_its_prior(
    outcomes: int,
) -> None:
    """Small n: after the first 100 or 200 outcomes of GSM8K (single subject: no word predicts
    failure), the learned part's noise must not cost ranking quality against the prior alone.
    Without a check of whether learning ranks better (the learned part's weight), it cost
    0.020 APGR at 100 outcomes and 0.011 at 200 on these seeds (20-39, not used to choose
    the weight's constants); with it, 0.004 and 0.004."""
    results = [_apgr_on_held_out_gsm8k(seed, learn=outcomes) for seed in range(20, 40)]
    over_prior = [learned - prior for learned, prior, _ in results]
    assert sum(over_prior) / len(over_prior) >= -0.006, over_prior


def test_learning_overrules_a_prior_that_is_wrong() -> None:
    """The prior says longer prompts fail more often; on traffic where economy fails on the
    short prompts and succeeds on the long ones, the learned combination must turn that
    round: after 400 outcomes, unseen short prompts score above unseen long ones."""
    prompts = sorted((p for p, _ in _gsm8k()), key=len)
    short, long = prompts[:300], prompts[-300:]
    rng = random.Random(1)
    router = Router(RoutingSettings())
    before_short = [_score(router, p) for p in short[250:]]
    before_long = [_score(router, p) for p in long[250:]]
    assert sum(before_long) > sum(before_short)  # the prior's view
    for _ in range(400):
        hard = rng.random() < 0.5
        text = rng.choice(short[:250] if hard else long[:250])
        router.learn(_body(text), "economy", "failure" if hard else "success")
    after_short = [_score(router, p) for p in short[250:]]
    after_long = [_score(router, p) for p in long[250:]]
    assert sum(after_short) / 50 > sum(after_long) / 50 + 0.1


def test_the_published_model_scores_exactly_as_the_learner_and_cannot_learn() -> None:
    """The shared learner publishes a scoring-only model (numpy, no River) for dispatchers:
    every score, explanation and count must be the learner's own, for the global model, a
    feature's own model and a feature past the cap, before and after more learning."""
    from app.routing.scoring import ScoringModel

    rng = random.Random(11)
    data = _gsm8k()
    learner = Router(RoutingSettings(max_feature_models=2))
    probes = [p for p, _ in rng.sample(data, 60)] + [t for t, _ in _topic_stream(20, seed=5)]
    for round_ in range(2):
        for text, failed in rng.sample(data, 150) + _topic_stream(60, seed=round_):
            feature = rng.choice([None, "support", "tutor", "beyond-the-cap"])
            learner.learn(_body(text), "economy", "failure" if failed else "success", feature)
        published = Router.restore(
            RoutingSettings(max_feature_models=2), learner.published_snapshot()
        )
        assert type(published.model) is ScoringModel
        assert published.model.learned_weight == learner.model.learned_weight
        assert learner.model.learned_weight != GATE_DEFAULT  # measured, not the default
        for text in probes:
            for feature in (None, "support", "tutor", "beyond-the-cap", "unknown"):
                mine = learner.model.score(learner.features(_body(text)), feature)
                theirs = published.model.score(published.features(_body(text)), feature)
                assert theirs == mine  # value, every part and the count, bit for bit
                assert theirs.reason() == mine.reason()
    with pytest.raises(TypeError, match="router-learn"):
        published.learn(_body("hi"), "economy", "failure")
    with pytest.raises(TypeError, match="router-learn"):
        published.snapshot()


def test_a_published_model_from_another_version_is_refused_with_a_reason() -> None:
    from app.routing.scoring import _SCORING_MAGIC

    data = Router(RoutingSettings()).published_snapshot()
    with pytest.raises(RouterCheckpointError, match="version 99"):
        Router.restore(RoutingSettings(), _SCORING_MAGIC + (99).to_bytes(4, "big") + data[-10:])
    with pytest.raises(RouterCheckpointError, match="not readable"):
        Router.restore(RoutingSettings(), data[: len(_SCORING_MAGIC) + 4] + b"garbage")
    with pytest.raises(RouterCheckpointError, match="not a published router model"):
        Router.restore(RoutingSettings(), _SCORING_MAGIC + b"\x00")  # cut short (was a crash)


def test_the_learned_part_is_weighed_by_how_it_ranked_against_the_prior() -> None:
    """The learned part's weight (prequential: each outcome scored before it was learned)
    rises above its default when the learned log-odds ranked the recent outcomes better than
    the prior, falls below it when they ranked worse, and cannot be measured until five of
    each outcome were seen (a new model keeps its default weight until then)."""
    rng = random.Random(2)
    rows = [(rng.gauss(0, 1), rng.gauss(0, 1), rng.random() < 0.3) for _ in range(150)]
    assert learned_weight(rows[:6]) is None
    assert learned_weight([]) is None
    router = Router(RoutingSettings())
    for text, failed in [("What is 2 + 2?", True), ("Name a colour.", False)] * 4:
        router.learn(_body(text), "economy", "failure" if failed else "success")
    assert router.model.learned_weight == GATE_DEFAULT
    better = [(prior, 2.0 * failed + noise, failed) for prior, noise, failed in rows]
    worse = [(2.0 * failed + noise, prior, failed) for prior, noise, failed in rows]
    alike = [(prior, prior, failed) for prior, _, failed in rows]
    assert learned_weight(better) > 0.95
    assert learned_weight(worse) < 0.05
    assert learned_weight(alike) == pytest.approx(GATE_DEFAULT)


def test_a_checkpoint_from_before_the_learned_weight_restores_and_learns_on() -> None:
    """A version-2 checkpoint written before the learned part's weight existed (no
    prequential record) restores scoring exactly as it did (full weight: an upgrade does not
    move routing), and its weight is measured once new outcomes allow."""
    import pickle
    import struct
    import zlib

    data = _gsm8k()
    router = Router(RoutingSettings())
    for text, failed in data[:100]:
        router.learn(_body(text), "economy", "failure" if failed else "success")
    model = router.model
    del model.prequential, model.learned_weight  # type: ignore[attr-defined]
    old = _SNAPSHOT_MAGIC + struct.pack(">I", 2) + zlib.compress(pickle.dumps(model))
    restored = Router.restore(RoutingSettings(), old)
    assert restored.model.learned_weight == 1.0
    unweighted = restored.model._score(restored.features(_body(data[200][0])), None, 1.0)
    assert _score(restored, data[200][0]) == unweighted.value
    for text, failed in data[100:200]:
        restored.learn(_body(text), "economy", "failure" if failed else "success")
    assert len(restored.model.prequential) == 100  # type: ignore[attr-defined]
    assert restored.model.learned_weight != GATE_DEFAULT
