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
4. The learned log-odds weigh ``n / (n + warmup_outcomes)`` against the prior; a feature
   with its own model mixes it with the global one the same way.

Scoring never changes the model; only :meth:`FailureModel.learn` does.
"""

from __future__ import annotations

import math
import pickle
import struct
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from river import linear_model, optim, preprocessing

from app.routing.signals import (
    PRIOR_INTERCEPT,
    PRIOR_WEIGHTS,
    SIGNAL_LABELS,
    SIGNAL_NAMES,
    PromptView,
    analyse,
)

SNAPSHOT_VERSION = 2  # 2: the learned part became a stack of experts
_SNAPSHOT_MAGIC = b"tollgate-router-model\n"
_SMOOTHING = 20.0  # pseudo-outcomes pulling a word's failure rate towards the overall rate
_EPSILON = 1e-6
FEATURE_BITS_FEWER = 3  # a feature learner folds keys into 2**(hash_bits - 3) buckets
GLOBAL = "*"
# Significant-word evidence: a key whose failures are at least SIGNIFICANT_Z binomial standard
# deviations from the overall rate, seen at least SIGNIFICANT_MIN_SEEN times. On multi-subject
# traffic one word (a subject's name, its vocabulary) can carry the signal, and the mean over a
# prompt's fifty other words drowns it (docs/SAVINGS.md, "Measured quality").
SIGNIFICANT_Z = 2.0
SIGNIFICANT_MIN_SEEN = 5
# Standardised inputs are clipped to +-Z_CLIP deviations, learning and scoring alike: a prompt
# far outside what was learned (a feature that starts sending long documents) must not swing
# the score by a weight times dozens of deviations.
Z_CLIP = 4.0
# A learner's dense per-key tables, the columns of one array (one gather reads all four).
_TABLE_COLUMNS = ("seen", "failed", "key_logit", "key_log_seen")


class RouterCheckpointError(ValueError):
    """A checkpoint that cannot be restored; the message says why and what to do."""


def _logit(p: float) -> float:
    p = min(max(p, _EPSILON), 1 - _EPSILON)
    return math.log(p / (1 - p))


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@dataclass(frozen=True, slots=True)
class Features:
    """Everything the model reads from one prompt (computed once, used to score and learn)."""

    signals: dict[str, float]
    keys: np.ndarray  # distinct hashed keys (intp), < 2**hash_bits

    @classmethod
    def of(cls, view: PromptView, hash_bits: int) -> Features:
        analysis = analyse(view, hash_bits)
        return cls(analysis.signals, analysis.keys)


# The named parts of a score's log-odds, in a fixed order (lists, not dicts: cheaper to mix).
PARTS: tuple[str, ...] = (*SIGNAL_NAMES, "similar_outcomes", "baseline")
_BASELINE = PARTS.index("baseline")
# The word evidence's four summaries (see _Learner._evidence), inputs of the learned part.
EVIDENCE: tuple[str, ...] = (
    "evidence_mean",
    "evidence_sum",
    "evidence_significant",
    "evidence_strongest",
)
# The learned part's experts, each a River logistic regression over these standardised
# inputs, combined by one more (a stack) that learns how far to trust each:
# the prior alone (its scale learned: a calibrated prior), the prior with the word evidence,
# and every signal re-weighed on its own with the word evidence. On single-subject traffic,
# where no word predicts failure, the stack leans on the calibrated prior; where a subject's
# words do, on the evidence (docs/SAVINGS.md, "Measured quality").
EXPERTS: tuple[tuple[str, ...], ...] = (
    ("prior",),
    ("prior", *EVIDENCE),
    (*SIGNAL_NAMES, *EVIDENCE),
)
_EXPERT_NAMES = tuple(f"expert_{index}" for index in range(len(EXPERTS)))
_INPUT_PART = {
    **{name: PARTS.index(name) for name in SIGNAL_NAMES},
    **dict.fromkeys(EVIDENCE, PARTS.index("similar_outcomes")),
}


@dataclass(frozen=True, slots=True)
class Score:
    """P(economy fails), the log-odds parts behind it (in :data:`PARTS` order), and how
    much was learned."""

    value: float
    parts: tuple[float, ...]
    outcomes_learned: int

    @property
    def contributions(self) -> dict[str, float]:
        """Signal name (or "similar_outcomes") -> its log-odds, the intercept left out."""
        return {
            name: part for name, part in zip(PARTS, self.parts, strict=True) if name != "baseline"
        }

    def reason(self, top: int = 3) -> str:
        """A sentence naming the signals that weighed most (never any prompt text)."""
        ranked = sorted(
            (
                (name, c)
                for name, c in zip(PARTS, self.parts, strict=True)
                if abs(c) >= 0.05 and name != "baseline"
            ),
            key=lambda item: -abs(item[1]),
        )[:top]
        parts = [f"{SIGNAL_LABELS.get(name, name)} {c:+.2f}" for name, c in ranked]
        basis = (
            f"learned from {self.outcomes_learned} outcomes"
            if self.outcomes_learned
            else "prior only, no outcomes learned yet"
        )
        weighed = "; ".join(parts) if parts else "no signal stands out"
        return f"P(economy fails)={self.value:.2f} ({basis}): {weighed}"


@dataclass(frozen=True, slots=True)
class _Combined:
    """A learner's log-odds as ``constant + sum(weights[input] * standardised input)``."""

    weights: dict[str, float]
    constant: float


class _Learner:
    """One scope's learned part (the global scope, or one feature)."""

    def __init__(self, learning_rate: float, bits: int) -> None:
        # One scaler standardises every input; each expert is a River logistic regression over
        # some of them (EXPERTS); the stack is one more over the experts' log-odds.
        self.scaler = preprocessing.StandardScaler()
        self.experts = [linear_model.LogisticRegression(optim.SGD(learning_rate)) for _ in EXPERTS]
        self.stack_scaler = preprocessing.StandardScaler()
        self.stack = linear_model.LogisticRegression(optim.SGD(learning_rate))
        # Dense tables indexed by hashed key (a feature's learner folds keys into fewer
        # bits): prompts containing it, economy failures among them, their smoothed failure
        # log-odds (when last counted) and log(prompts containing it). Dense so that scoring
        # is a handful of vector operations with no Python work per word.
        self.mask = (1 << bits) - 1
        self._set_table(np.zeros((1 << bits, len(_TABLE_COLUMNS)), dtype=np.float32))
        self.outcomes = 0
        self.failures = 0
        # What scoring reads, refreshed after each update (:meth:`_refresh`): plain numbers,
        # so that a score is a few dozen multiplications with no River call.
        self._centers: dict[str, tuple[float, float]] = {}  # input -> (mean, deviation)
        self._experts: list[tuple[float, dict[str, float]]] = [(0.0, {}) for _ in EXPERTS]
        self._stack: list[tuple[int, float, float, float]] = []  # (expert, weight, mean, dev)
        self._stack_intercept = 0.0
        self._combined = _Combined({}, 0.0)  # the whole, when no expert's log-odds is clipped
        self._derive()

    def _base_rate(self) -> float:
        return (self.failures + 1.0) / (self.outcomes + 2.0)

    def _evidence(self, keys: np.ndarray) -> tuple[float, float, float, float]:
        """The words' failure log-odds deviations from the overall rate, four ways:
        rarity-weighted mean, normalised sum, sum over the significant keys, and the most
        significant key's (0.0 each before any outcome)."""
        if not self.outcomes or not keys.size:
            return 0.0, 0.0, 0.0, 0.0
        # One gather of the keys' rows (a key's four numbers share a cache line), the counted
        # keys, then one array per number, contiguous as when they were four tables: the sums
        # below add the same float32 numbers in the same order.
        rows = self._table.take(keys & self.mask, axis=0)
        rows = rows.compress(rows[:, 0] > 0, axis=0)
        if not rows.shape[0]:
            return 0.0, 0.0, 0.0, 0.0
        seen, failed, key_logit, key_log_seen = rows.T.copy()
        base = self._base_rate()
        deviations = key_logit - _logit(base)
        rarity = (math.log(self.outcomes + 1.0) + 0.1) - key_log_seen
        mean = float(np.dot(deviations, rarity) / rarity.sum())
        total = float(deviations.sum() / math.sqrt(deviations.size))
        # How far each key's failures are from what the overall rate predicts, in binomial
        # standard deviations; keys seen fewer than SIGNIFICANT_MIN_SEEN times do not count.
        z = (failed - seen * base) / np.sqrt(seen * (base * (1.0 - base)))
        z[seen < SIGNIFICANT_MIN_SEEN] = 0.0
        strength = np.abs(z)
        significant = float(deviations[strength >= SIGNIFICANT_Z].sum())
        strongest = int(strength.argmax())
        top = float(deviations[strongest]) if strength[strongest] > 0 else 0.0
        return mean, total, significant, top

    def inputs(self, features: Features, prior_logit: float) -> dict[str, float]:
        return self.inputs_with({"prior": prior_logit, **features.signals}, features.keys)

    def inputs_with(
        self, prior_and_signals: Mapping[str, float], keys: np.ndarray
    ) -> dict[str, float]:
        """:meth:`inputs` from the prior's log-odds and the signals (one dict for every learner
        that scores a prompt) and the prompt's keys."""
        inputs = dict(prior_and_signals)
        inputs.update(zip(EVIDENCE, self._evidence(keys), strict=True))
        return inputs

    def _standardised(self, inputs: Mapping[str, float]) -> dict[str, float]:
        """Each input in deviations from its learned mean, clipped to +-Z_CLIP; inputs with
        no variance yet are left out (they count 0)."""
        z = {}
        for name, (mean, deviation) in self._centers.items():
            value = (inputs[name] - mean) / deviation
            z[name] = Z_CLIP if value > Z_CLIP else -Z_CLIP if value < -Z_CLIP else value
        return z

    def _expert_logits(self, z: Mapping[str, float]) -> list[float]:
        logits = []
        for intercept, weights in self._expert_terms:
            logit = intercept
            for name, weight in weights:
                logit += weight * z.get(name, 0.0)
            logits.append(logit)
        return logits

    def _combine(self, shares: Mapping[int, float]) -> _Combined:
        """The stack's log-odds as one weight per standardised input plus a constant, when
        expert ``i``'s log-odds counts ``shares[i]`` per unit (its stack weight over its
        deviation, scaled down when it is clipped)."""
        weights: dict[str, float] = {}
        constant = self._stack_intercept
        for index, _, mean, _ in self._stack:
            share = shares[index]
            intercept, expert_weights = self._experts[index]
            constant += share * (intercept - mean)
            for name, weight in expert_weights.items():
                weights[name] = weights.get(name, 0.0) + share * weight
        return _Combined(weights, constant)

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

    # What scoring reads of the above, in the order it is added up (derived, so not in
    # checkpoints: rebuilt on restore).
    _DERIVED = ("_expert_terms", "_combined_terms")

    def _derive(self) -> None:
        self._expert_terms = [
            (intercept, tuple(weights.items())) for intercept, weights in self._experts
        ]
        self._combined_terms = self._terms(self._combined)

    def _terms(
        self, combined: _Combined
    ) -> tuple[tuple[str, float, float, float, float, int], ...]:
        """(input, weight, mean, deviation, weight per unit of the input, its part or -1 for
        the prior) of each input of ``combined`` that counts: a non-zero weight, and a
        variance (the inputs :meth:`_standardised` gives)."""
        return tuple(
            (name, weight, mean, deviation, weight / deviation, _INPUT_PART.get(name, -1))
            for name, weight in combined.weights.items()
            if weight and name in self._centers
            for mean, deviation in [self._centers[name]]
        )

    def contributions(
        self, inputs: Mapping[str, float], prior_parts: list[float]
    ) -> tuple[float, list[float]]:
        """Log-odds of this learner and its parts in :data:`PARTS` order (they add up to it).

        The stack's log-odds is linear in the experts' (each clipped to +-Z_CLIP deviations,
        which scales its share), and each expert's is linear in the standardised inputs, so
        the whole is one weight per input plus a constant: the parts are those terms."""
        z = self._standardised(inputs)
        logits = self._expert_logits(z)
        combined = self._combined
        terms = self._combined_terms
        shares: dict[int, float] = {}
        clipped_any = False
        for index, weight, mean, deviation in self._stack:
            logit = logits[index]
            shares[index] = weight / deviation
            # an expert far off its learned range (not rare: 45 % of the learners' scores in the
            # overhead benchmark clip one); its share is scaled down
            if abs(logit - mean) > Z_CLIP * deviation:
                clipped = mean + math.copysign(Z_CLIP * deviation, logit - mean)
                shares[index] *= (clipped - mean) / (logit - mean)
                clipped_any = True
        if clipped_any:
            combined = self._combine(shares)
            terms = self._terms(combined)
        parts = [0.0] * len(PARTS)
        baseline = combined.constant
        logit = combined.constant
        for name, weight, mean, deviation, scale, part in terms:
            value = z[name]
            logit += weight * value
            clipped = mean + value * deviation
            if part < 0:
                # the prior's log-odds, spread back over the signals it is made of
                raw = inputs["prior"] - PRIOR_INTERCEPT
                if raw:
                    baseline += scale * (PRIOR_INTERCEPT - mean)
                    shrink = (clipped - PRIOR_INTERCEPT) / raw
                    for index, prior_part in enumerate(prior_parts):
                        parts[index] += scale * prior_part * shrink
                else:
                    baseline += scale * (clipped - mean)
            else:
                parts[part] += scale * clipped
                baseline -= scale * mean
        parts[_BASELINE] += baseline
        return logit, parts

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

    def _set_table(self, table: np.ndarray) -> None:
        """The dense tables, one column each of ``table`` (views: learning writes through
        them)."""
        self._table = table
        self.seen, self.failed, self.key_logit, self.key_log_seen = table.T

    # Checkpoints hold the counted keys only (a few thousand), not the dense tables, one
    # (size, keys, values) per column name: the same state as when the columns were four
    # arrays (checkpoints of SNAPSHOT_VERSION 2 written before restore unchanged, and the
    # checkpoints written now restore in those versions). Views do not survive pickling: the
    # table is rebuilt and its columns viewed again, the derived terms derived again.
    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        for name in ("_table", *self._DERIVED):
            del state[name]
        counted = np.flatnonzero(self.seen).astype(np.uint32)
        for name in _TABLE_COLUMNS:
            state[name] = (len(self.seen), counted, state[name][counted])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        size = state["seen"][0]
        table = np.zeros((size, len(_TABLE_COLUMNS)), dtype=np.float32)
        for column, name in enumerate(_TABLE_COLUMNS):
            stored_size, counted, values = state.pop(name)
            if stored_size != size:
                raise ValueError(f"{name} has {stored_size} keys, seen has {size}")
            table[counted, column] = values
        self.__dict__.update(state)
        self._set_table(table)
        self._derive()


class FailureModel:
    """P(economy fails | prompt), per feature with a global fallback, learned online."""

    def __init__(
        self,
        *,
        hash_bits: int = 18,
        learning_rate: float = 0.01,
        warmup_outcomes: int = 30,
        max_feature_models: int = 100,
    ) -> None:
        self.hash_bits = hash_bits
        self.learning_rate = learning_rate
        self.warmup_outcomes = warmup_outcomes
        self.max_feature_models = max_feature_models
        self.global_learner = _Learner(learning_rate, hash_bits)
        self.feature_learners: OrderedDict[str, _Learner] = OrderedDict()

    @property
    def outcomes_learned(self) -> int:
        return self.global_learner.outcomes

    def features(self, view: PromptView) -> Features:
        return Features.of(view, self.hash_bits)

    def score(self, features: Features, feature: str | None = None) -> Score:
        """P(economy fails) for a prompt of ``feature``; pure (the model is not changed)."""
        prior_parts = _prior_parts(features.signals)
        prior_logit = PRIOR_INTERCEPT + sum(prior_parts)
        parts = [*prior_parts, 0.0, PRIOR_INTERCEPT]
        logit = prior_logit
        learner = self.global_learner
        if learner.outcomes:
            prior_and_signals = {"prior": prior_logit, **features.signals}
            learned, learned_parts = learner.contributions(
                learner.inputs_with(prior_and_signals, features.keys), prior_parts
            )
            own = self.feature_learners.get(feature) if feature is not None else None
            if own is not None and own.outcomes:
                own_logit, own_parts = own.contributions(
                    own.inputs_with(prior_and_signals, features.keys), prior_parts
                )
                share = own.outcomes / (own.outcomes + self.warmup_outcomes)
                learned = share * own_logit + (1 - share) * learned
                learned_parts = _mix(own_parts, share, learned_parts)
            trust = learner.outcomes / (learner.outcomes + self.warmup_outcomes)
            logit = trust * learned + (1 - trust) * prior_logit
            parts = _mix(learned_parts, trust, parts)
        return Score(_sigmoid(logit), tuple(parts), learner.outcomes)

    def learn(self, features: Features, failed: bool, feature: str | None = None) -> None:
        """Learn one economy-tier outcome (``failed``) of a prompt of ``feature``."""
        prior_logit = PRIOR_INTERCEPT + sum(_prior_parts(features.signals))
        self.global_learner.learn(features, prior_logit, failed)
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
        header = _SNAPSHOT_MAGIC + struct.pack(">I", SNAPSHOT_VERSION)
        return header + zlib.compress(pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL), 1)

    @classmethod
    def restore(cls, data: bytes) -> FailureModel:
        header = len(_SNAPSHOT_MAGIC) + 4
        if len(data) < header or not data.startswith(_SNAPSHOT_MAGIC):
            raise RouterCheckpointError("not a router-model checkpoint; delete it to start fresh")
        (version,) = struct.unpack(">I", data[len(_SNAPSHOT_MAGIC) : header])
        if version != SNAPSHOT_VERSION:
            raise RouterCheckpointError(
                f"router checkpoint version {version} is not {SNAPSHOT_VERSION} (written by "
                "another Tollgate version); delete it to learn again from outcomes"
            )
        try:
            model = pickle.loads(zlib.decompress(data[header:]))
        except Exception as exc:
            raise RouterCheckpointError(
                f"router checkpoint is not readable ({type(exc).__name__}: {exc}); "
                "delete it to learn again from outcomes"
            ) from exc
        if not isinstance(model, cls):
            raise RouterCheckpointError("router checkpoint does not hold a model; delete it")
        return model


def _prior_parts(signals: Mapping[str, float]) -> list[float]:
    """Each signal's share of the cold-start log-odds, in SIGNAL_NAMES order."""
    return [PRIOR_WEIGHTS[name] * signals[name] for name in SIGNAL_NAMES]


def _mix(first: list[float], share: float, second: list[float]) -> list[float]:
    """``share * first + (1 - share) * second``, part by part."""
    rest = 1.0 - share
    return [share * a + rest * b for a, b in zip(first, second, strict=True)]
