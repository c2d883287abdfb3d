"""Scoring with a learned failure model, with numpy alone: what a dispatcher needs.

Owns :class:`Features` (what the model reads of a prompt), :class:`Score` and its
explanation, each learner's scoring state (:class:`LearnerScores`: the per-key tables and
the plain numbers copied from its River models after every update) and :class:`ScoringModel`
(P(economy fails) from the global learner and the prompt's feature's). Learning, and the River
models it needs, are :mod:`app.routing.model`'s: :class:`~app.routing.model.FailureModel`
extends :class:`ScoringModel`, so both score with the same code.

Why a module of its own: River imports scipy, together about 90 MB of resident memory. A
dispatcher that shares the router learner (``routing.shared_learning``) never learns; it
restores the learner's published model (:meth:`ScoringModel.scoring_snapshot`, a pickle of
these classes only) and scores with it, so River and scipy never load in it. Its scores are
the learner's exactly (tested).
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

from app.routing.signals import (
    PRIOR_INTERCEPT,
    PRIOR_WEIGHTS,
    SIGNAL_LABELS,
    SIGNAL_NAMES,
    PromptView,
    analyse,
)

# A scoring-only model (what the shared learner publishes for dispatchers); version 1.
SCORING_VERSION = 1
_SCORING_MAGIC = b"tollgate-router-scores\n"

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
# The learned part's weight against the prior: how much better it has *ranked* than the
# prior alone on the last GATE_WINDOW outcomes, each scored before it was learned
# (prequential). With z = (AUC learned - AUC prior) / (GATE_DEVIATION * sqrt(1/failures +
# 1/successes)), the weight is sigmoid(GATE_SLOPE * (z - GATE_OFFSET)): 0.73 when the two rank
# alike or too few of either outcome were seen (fewer than GATE_MIN_EACH), towards 1 when
# learning ranks clearly better, towards 0 when it ranks worse. Why: with a few hundred
# outcomes of traffic where no word predicts failure, the learned part ranked worse than
# the prior (GSM8K: -0.018 APGR at 100 outcomes) and nothing told it so; log-loss did not
# (it does not see ranking). GATE_DEVIATION 0.35 (paired AUCs are correlated: below the
# unpaired 0.5), GATE_SLOPE 2, GATE_OFFSET -0.5 and the window (150 reacts sooner than 300 to
# a learned part that has started to rank better) were chosen on development splits
# (docs/SAVINGS.md, "Learning from few outcomes").
GATE_WINDOW = 150
GATE_MIN_EACH = 5
GATE_DEVIATION = 0.35
GATE_SLOPE = 2.0
GATE_OFFSET = -0.5
GATE_DEFAULT = 1.0 / (1.0 + math.exp(GATE_SLOPE * GATE_OFFSET))
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


class LearnerScores:
    """One scope's scoring state (the global scope, or one feature): the per-key tables and
    the plain numbers scoring reads. :class:`~app.routing.model._Learner` adds the River
    models they are copied from."""

    def __init__(self, bits: int) -> None:
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

    def scores(self) -> LearnerScores:
        """This learner's scoring state as a :class:`LearnerScores` (shares its arrays)."""
        view = LearnerScores.__new__(LearnerScores)
        view.__dict__.update(
            (name, value) for name, value in self.__dict__.items() if name not in _TRAINING
        )
        return view


# What a learner holds for learning only (River models): not in a scoring view.
_TRAINING = frozenset({"scaler", "experts", "stack_scaler", "stack"})


class ScoringModel:
    """P(economy fails | prompt), per feature with a global fallback: scoring only.

    :class:`~app.routing.model.FailureModel` extends it with learning and full checkpoints;
    :meth:`scoring_snapshot` gives what a dispatcher needs to score exactly as it does."""

    # The learned part's weight against the prior (see GATE_WINDOW); a class default so that
    # models pickled before it existed restore with it.
    learned_weight: float = GATE_DEFAULT

    def __init__(
        self,
        *,
        hash_bits: int = 18,
        warmup_outcomes: int = 30,
        max_feature_models: int = 100,
    ) -> None:
        self.hash_bits = hash_bits
        self.warmup_outcomes = warmup_outcomes
        self.max_feature_models = max_feature_models
        self.global_learner = LearnerScores(hash_bits)
        self.feature_learners: OrderedDict[str, LearnerScores] = OrderedDict()

    @property
    def outcomes_learned(self) -> int:
        return self.global_learner.outcomes

    def features(self, view: PromptView) -> Features:
        return Features.of(view, self.hash_bits)

    def score(self, features: Features, feature: str | None = None) -> Score:
        """P(economy fails) for a prompt of ``feature``; pure (the model is not changed)."""
        return self._score(features, feature, self.learned_weight)

    def _score(self, features: Features, feature: str | None, learned_weight: float) -> Score:
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
            trust *= learned_weight
            logit = trust * learned + (1 - trust) * prior_logit
            parts = _mix(learned_parts, trust, parts)
        return Score(_sigmoid(logit), tuple(parts), learner.outcomes)

    def learn(self, features: Features, failed: bool, feature: str | None = None) -> None:
        raise TypeError(
            "this router model only scores (the shared learner's published model): outcomes "
            "are learned by `tollgate router-learn`"
        )

    def scoring_snapshot(self) -> bytes:
        """What a dispatcher needs to score exactly as this model does, as bytes: a versioned
        header, then a zlib-compressed pickle of this module's classes only (restoring it
        imports no River). Store it where only Tollgate writes (unpickling runs code)."""
        view = ScoringModel.__new__(ScoringModel)
        view.hash_bits = self.hash_bits
        view.warmup_outcomes = self.warmup_outcomes
        view.max_feature_models = self.max_feature_models
        view.learned_weight = self.learned_weight
        view.global_learner = self.global_learner.scores()
        view.feature_learners = OrderedDict(
            (name, learner.scores()) for name, learner in self.feature_learners.items()
        )
        return dump_versioned(_SCORING_MAGIC, SCORING_VERSION, view)

    @classmethod
    def restore_scoring(cls, data: bytes) -> ScoringModel:
        model = load_versioned(
            data,
            _SCORING_MAGIC,
            SCORING_VERSION,
            what="published router model",
            advice="run the same Tollgate version everywhere",
        )
        if type(model) is not ScoringModel:
            raise RouterCheckpointError("published router model does not hold a scoring model")
        return model


def dump_versioned(magic: bytes, version: int, value: object) -> bytes:
    """``magic``, a big-endian version, then a zlib-compressed pickle of ``value``."""
    header = magic + struct.pack(">I", version)
    return header + zlib.compress(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), 1)


def load_versioned(data: bytes, magic: bytes, version: int, *, what: str, advice: str) -> Any:
    """What :func:`dump_versioned` wrote, or ``RouterCheckpointError`` saying ``what`` is
    wrong and ``advice``. Unpickling runs code: only data Tollgate wrote."""
    header = len(magic) + 4
    if len(data) < header or not data.startswith(magic):
        raise RouterCheckpointError(f"not a {what}; {advice}")
    (found,) = struct.unpack(">I", data[len(magic) : header])
    if found != version:
        raise RouterCheckpointError(
            f"{what} version {found} is not {version} (written by another Tollgate version); "
            f"{advice}"
        )
    try:
        return pickle.loads(zlib.decompress(data[header:]))
    except Exception as exc:
        raise RouterCheckpointError(
            f"{what} is not readable ({type(exc).__name__}: {exc}); {advice}"
        ) from exc


def is_scoring_snapshot(data: bytes) -> bool:
    """Whether ``data`` is a :meth:`ScoringModel.scoring_snapshot` (else: a full checkpoint)."""
    return data.startswith(_SCORING_MAGIC)


def _prior_parts(signals: Mapping[str, float]) -> list[float]:
    """Each signal's share of the cold-start log-odds, in SIGNAL_NAMES order."""
    return [PRIOR_WEIGHTS[name] * signals[name] for name in SIGNAL_NAMES]


def _mix(first: list[float], share: float, second: list[float]) -> list[float]:
    """``share * first + (1 - share) * second``, part by part."""
    rest = 1.0 - share
    return [share * a + rest * b for a, b in zip(first, second, strict=True)]
