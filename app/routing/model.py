"""The failure model: P(the economy tier fails on this prompt), learned online from outcomes.

Owns the score in [0, 1], its explanation, learning one labelled outcome at a time, and
the checkpoint (:meth:`FailureModel.snapshot` / :meth:`FailureModel.restore`, bytes that
can go on a compacted topic as the anomaly models do). It does not own tiers, rules or
requests (:mod:`app.routing.router`) or what a signal is (:mod:`app.routing.signals`).

How a score is made, all in log-odds so every part adds up and can be explained:

1. **Prior**: hand-set weights on the signals (:data:`app.routing.signals.PRIOR_WEIGHTS`),
   so a router with no outcomes yet still prefers economy for short plain questions.
2. **Word evidence**: per hashed word / word pair, how often the economy tier failed on
   prompts containing it (Beta-smoothed towards the overall failure rate). A prompt gets
   the mean (weighted by rarity) and a normalised sum of its words' deviations. Counts
   converge after a few examples per topic, where a linear model over words learned by
   SGD needs many passes. Two more summaries pick out the words that matter: the sum over
   the *significant* keys (failures at least :data:`SIGNIFICANT_Z` binomial deviations from
   the overall rate) and the deviation of the most significant key, so that one word naming
   a subject is not drowned by the mean over the prompt's other words.
3. **Learned combination**, a stack: three River ``LogisticRegression`` experts over
   standardised inputs (:data:`EXPERTS`: the prior's log-odds alone, i.e. a calibrated
   prior; the prior with the four evidence values; every signal on its own with the
   evidence), and a fourth over the experts' log-odds that learns how far to trust each.
   Every input is computed *before* the example updates the counts, and the stack learns
   from the experts' log-odds *before* they learn the example, so it weighs them by how they
   do on prompts they have not seen: where no word predicts failure it keeps to the
   calibrated prior instead of overriding it with noisy word evidence.
4. The learned log-odds weigh ``n / (n + warmup_outcomes)`` against the prior, times the
   learned part's weight: how much better it ranked than the prior alone on the last
   :data:`~app.routing.scoring.GATE_WINDOW` outcomes, each scored before it was learned
   (:func:`learned_weight`); a feature with its own model mixes it with the global one the
   way warm-up does.

Scoring never changes the model; only :meth:`FailureModel.learn` does.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterable

import numpy as np
from river import linear_model, optim, preprocessing
from scipy.stats import rankdata  # River imports scipy already

from app.routing.scoring import (  # noqa: F401  (names older checkpoints' pickles reference)
    _EXPERT_NAMES,
    _INPUT_PART,
    EXPERTS,
    FEATURE_BITS_FEWER,
    GATE_DEFAULT,
    GATE_DEVIATION,
    GATE_MIN_EACH,
    GATE_OFFSET,
    GATE_SLOPE,
    GATE_WINDOW,
    GLOBAL,
    PARTS,
    Z_CLIP,
    Features,
    LearnerScores,
    RouterCheckpointError,
    Score,
    ScoringModel,
    _Combined,
    _logit,
    _mix,
    _prior_parts,
    _sigmoid,
    dump_versioned,
    load_versioned,
)
from app.routing.signals import PRIOR_INTERCEPT

SNAPSHOT_VERSION = 2  # 2: the learned part became a stack of experts
_SNAPSHOT_MAGIC = b"tollgate-router-model\n"
_SMOOTHING = 20.0  # pseudo-outcomes pulling a word's failure rate towards the overall rate


class _Learner(LearnerScores):
    """One scope's learned part: its scoring state and the River models behind it."""

    def __init__(self, learning_rate: float, bits: int) -> None:
        # One scaler standardises every input; each expert is a River logistic regression over
        # some of them (EXPERTS); the stack is one more over the experts' log-odds.
        self.scaler = preprocessing.StandardScaler()
        self.experts = [linear_model.LogisticRegression(optim.SGD(learning_rate)) for _ in EXPERTS]
        self.stack_scaler = preprocessing.StandardScaler()
        self.stack = linear_model.LogisticRegression(optim.SGD(learning_rate))
        super().__init__(bits)

    def _refresh_centers(self) -> None:
        means, variances = self.scaler.means, self.scaler.vars
        self._centers = {
            name: (means[name], math.sqrt(variance))
            for name, variance in variances.items()
            if variance > 0
        }

    def _refresh(self) -> None:
        self._refresh_centers()
        self._experts = [(float(expert.intercept), dict(expert.weights)) for expert in self.experts]
        stack_weights = self.stack.weights
        stack_means, stack_variances = self.stack_scaler.means, self.stack_scaler.vars
        self._stack = [
            (index, weight, stack_means[name], math.sqrt(stack_variances[name]))
            for index, name in enumerate(_EXPERT_NAMES)
            if (weight := stack_weights.get(name, 0.0)) and stack_variances.get(name, 0.0) > 0
        ]
        self._stack_intercept = float(self.stack.intercept)
        self._combined = self._combine(
            {index: weight / deviation for index, weight, _, deviation in self._stack}
        )
        self._derive()

    def learn(self, features: Features, prior_logit: float, failed: bool) -> None:
        inputs = self.inputs(features, prior_logit)  # before the counts include this prompt
        # The stack learns from the experts' log-odds before they learn this example: how
        # far each can be trusted on a prompt it has not seen.
        logits = dict(
            zip(_EXPERT_NAMES, self._expert_logits(self._standardised(inputs)), strict=True)
        )
        self.stack_scaler.learn_one(logits)
        stacked = self.stack_scaler.transform_one(logits)
        self.stack.learn_one({n: min(max(v, -Z_CLIP), Z_CLIP) for n, v in stacked.items()}, failed)
        self.scaler.learn_one(inputs)
        self._refresh_centers()  # the new centres standardise this example for the experts
        z = self._standardised(inputs)
        for expert, names in zip(self.experts, EXPERTS, strict=True):
            expert.learn_one({name: z[name] for name in names if name in z}, failed)
        self._refresh()
        self.outcomes += 1
        self.failures += failed
        base = self._base_rate()
        keys = np.unique(features.keys & self.mask)
        self.seen[keys] += 1
        self.failed[keys] += failed
        seen, failures = self.seen[keys], self.failed[keys]
        self.key_logit[keys] = np.log(failures + _SMOOTHING * base) - np.log(
            seen - failures + _SMOOTHING * (1 - base)
        )
        self.key_log_seen[keys] = np.log(seen)


class FailureModel(ScoringModel):
    """P(economy fails | prompt), per feature with a global fallback, learned online."""

    def __init__(
        self,
        *,
        hash_bits: int = 18,
        learning_rate: float = 0.01,
        warmup_outcomes: int = 30,
        max_feature_models: int = 100,
    ) -> None:
        super().__init__(
            hash_bits=hash_bits,
            warmup_outcomes=warmup_outcomes,
            max_feature_models=max_feature_models,
        )
        self.learning_rate = learning_rate
        self.global_learner: _Learner = _Learner(learning_rate, hash_bits)
        self.feature_learners: OrderedDict[str, _Learner] = OrderedDict()  # type: ignore[assignment]
        # (prior log-odds, learned log-odds at full weight, failed) of the last outcomes, each
        # scored before it was learned: what the learned part's weight is measured on.
        self.prequential: deque[tuple[float, float, bool]] = deque(maxlen=GATE_WINDOW)
        self.learned_weight = GATE_DEFAULT

    def learn(self, features: Features, failed: bool, feature: str | None = None) -> None:
        """Learn one economy-tier outcome (``failed``) of a prompt of ``feature``."""
        prior_logit = PRIOR_INTERCEPT + sum(_prior_parts(features.signals))
        if self.global_learner.outcomes:
            unweighted = self._score(features, feature, 1.0)
            self.prequential.append((prior_logit, _logit(unweighted.value), failed))
        self.global_learner.learn(features, prior_logit, failed)
        measured = learned_weight(self.prequential)
        if measured is not None:  # else it stays where it is until it can be measured
            self.learned_weight = measured
        if feature is None or feature == GLOBAL:
            return
        own = self.feature_learners.get(feature)
        if own is None:
            if len(self.feature_learners) >= self.max_feature_models:
                return  # bounded memory: this feature shares the global model
            own = self.feature_learners[feature] = _Learner(
                self.learning_rate, self.hash_bits - FEATURE_BITS_FEWER
            )
        own.learn(features, prior_logit, failed)

    # -- checkpoints ----------------------------------------------------------------------
    def snapshot(self) -> bytes:
        """Everything learned, as bytes: a versioned header, then a zlib-compressed pickle
        (River models pickle): about 400 KB after the 1,319 GSM8K prompts' outcomes over three
        features.
        Store it where only Tollgate writes (unpickling runs code from its input)."""
        return dump_versioned(_SNAPSHOT_MAGIC, SNAPSHOT_VERSION, self)

    @classmethod
    def restore(cls, data: bytes) -> FailureModel:
        model = load_versioned(
            data,
            _SNAPSHOT_MAGIC,
            SNAPSHOT_VERSION,
            what="router-model checkpoint",
            advice="delete it to learn again from outcomes",
        )
        if not isinstance(model, cls):
            raise RouterCheckpointError("router checkpoint does not hold a model; delete it")
        if not hasattr(model, "prequential"):  # written before the learned part's weight:
            model.prequential = deque(maxlen=GATE_WINDOW)  # it scores as it did until the
            model.learned_weight = 1.0  # weight can be measured on new outcomes
        return model


def _auc(scores: np.ndarray, failed: np.ndarray) -> float:
    """P(a failed prompt scores above a succeeded one), ties counting half."""
    ranks = rankdata(scores)
    failures = int(failed.sum())
    successes = len(failed) - failures
    return float((ranks[failed].sum() - failures * (failures + 1) / 2) / (failures * successes))


def learned_weight(prequential: Iterable[tuple[float, float, bool]]) -> float | None:
    """The learned part's weight against the prior, from (prior log-odds, learned log-odds,
    failed) of outcomes scored before they were learned (see ``GATE_WINDOW``); None while
    fewer than ``GATE_MIN_EACH`` of either outcome are among them."""
    rows = np.array(list(prequential), dtype=float).reshape(-1, 3)
    failed = rows[:, 2] > 0.5
    failures = int(failed.sum())
    successes = len(failed) - failures
    if failures < GATE_MIN_EACH or successes < GATE_MIN_EACH:
        return None
    gain = _auc(rows[:, 1], failed) - _auc(rows[:, 0], failed)
    z = gain / (GATE_DEVIATION * math.sqrt(1 / failures + 1 / successes))
    return _sigmoid(GATE_SLOPE * (z - GATE_OFFSET))
