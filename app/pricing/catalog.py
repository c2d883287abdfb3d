"""The price catalog: what a call cost, what it would have cost on the baseline model.

Owns model prices (genai-prices' offline database, overridden by a local YAML
file for negotiated or missing prices), the exact cost arithmetic in integer
nano-dollars (1e-9 USD), and each model's tier. A model without a price is
never costed as a real $0: its cost is reported with ``price_unknown=True``.

Overrides file (``TOLLGATE_PRICE_OVERRIDES_FILE``)::

    models:
      my-finetune:   {input_per_mtok: 0.30, output_per_mtok: 1.20, tier: economy}
      gpt-4o:        {input_per_mtok: 2.00, output_per_mtok: 8.00, cached_input_per_mtok: 1.00}
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml

# the one rounding of money; re-exported for the modules that import it from pricing
from app.validation import NANOS_PER_USD as NANOS_PER_USD
from app.validation import usd_to_nanos as usd_to_nanos

log = logging.getLogger(__name__)

Tier = Literal["premium", "standard", "economy"]
_MTOK = Decimal(1_000_000)
# The most nano-dollars an event's field holds (an Avro long): $9.22 billion.
MAX_EVENT_NANOS = 2**63 - 1
# The highest price per million tokens an override may set ($1 M: a call's worst case, 2^31
# tokens each way, then still fits an event).
MAX_PRICE_PER_MTOK = Decimal(1_000_000)
# Rates remembered (model names are free text a client sends: the memory is bounded; a lookup
# that missed the cache takes 0.1 ms for a priced model, 1.2 ms for an unknown one).
RATE_CACHE_SIZE = 10_000
# Models without a price logged one by one; past that one line says the rest are not.
LOGGED_UNKNOWN_MODELS = 100
# Tier by input price when neither an override nor a known model says otherwise.
PREMIUM_FROM_PER_MTOK = Decimal(5)
STANDARD_FROM_PER_MTOK = Decimal("0.9")


class PriceOverridesError(ValueError):
    """The overrides file is unreadable or malformed; the message names the model and field."""


@dataclass(frozen=True)
class ModelRate:
    model: str
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None  # None = cached input billed as normal input
    tier: Tier
    source: Literal["genai-prices", "override"]
    tiered: Any = None  # a genai-prices ModelPrice when its prices are not flat


@dataclass(frozen=True)
class Cost:
    cost_usd_nanos: int
    baseline_cost_usd_nanos: int
    prompt_cache_saved_usd_nanos: int
    price_unknown: bool
    tier: Tier | None


def event_nanos(usd: Decimal) -> int:
    """:func:`usd_to_nanos`, at most :data:`MAX_EVENT_NANOS`: a call's cost always fits its
    event (past $9.22 B only an absurd price or token count, recorded at that most rather
    than an event that does not encode and is lost)."""
    return min(usd_to_nanos(usd), MAX_EVENT_NANOS)


def nanos_to_usd(nanos: int) -> Decimal:
    return Decimal(nanos) / NANOS_PER_USD


def usd_text(amount: Decimal | int) -> str:
    """A USD amount as plain decimal text without trailing zeros: '10', '0.05' (never '1E+1').

    Integers are nano-dollars.
    """
    value = nanos_to_usd(amount) if isinstance(amount, int) else amount
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def tier_for_input_price(input_per_mtok: Decimal) -> Tier:
    if input_per_mtok >= PREMIUM_FROM_PER_MTOK:
        return "premium"
    if input_per_mtok >= STANDARD_FROM_PER_MTOK:
        return "standard"
    return "economy"


def _decimal(value: Any, model: str, field: str) -> Decimal:
    try:
        result = Decimal(str(value))
    except Exception:
        raise PriceOverridesError(
            f"price override {model}.{field}={value!r} is not a number"
        ) from None
    if not result.is_finite() or not 0 <= result <= MAX_PRICE_PER_MTOK:
        raise PriceOverridesError(
            f"price override {model}.{field}={value} must be a number of USD per million "
            f"tokens from 0 to {MAX_PRICE_PER_MTOK:,}"
        )
    return result


def load_overrides(path: Path) -> dict[str, ModelRate]:
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PriceOverridesError(f"cannot read price overrides {path}: {exc}") from exc
    models = document.get("models", {}) if isinstance(document, dict) else None
    if not isinstance(models, dict):
        raise PriceOverridesError(f"{path}: expected a top-level 'models:' mapping")
    rates = {}
    for model, entry in models.items():
        if not isinstance(entry, dict):
            raise PriceOverridesError(f"{path}: models.{model} must be a mapping")
        for required in ("input_per_mtok", "output_per_mtok"):
            if required not in entry:
                raise PriceOverridesError(f"{path}: models.{model}.{required} is missing")
        input_price = _decimal(entry["input_per_mtok"], model, "input_per_mtok")
        cached = entry.get("cached_input_per_mtok")
        tier = entry.get("tier") or tier_for_input_price(input_price)
        if tier not in ("premium", "standard", "economy"):
            raise PriceOverridesError(
                f"{path}: models.{model}.tier={tier!r}; use premium, standard or economy"
            )
        rates[str(model)] = ModelRate(
            model=str(model),
            input_per_mtok=input_price,
            output_per_mtok=_decimal(entry["output_per_mtok"], model, "output_per_mtok"),
            cached_input_per_mtok=None
            if cached is None
            else _decimal(cached, model, "cached_input_per_mtok"),
            tier=tier,
            source="override",
        )
    return rates


def _lookup_genai_prices(model: str, provider_id: str | None) -> ModelRate | None:
    from genai_prices import Usage, calc_price

    for provider in (provider_id, None) if provider_id else (None,):
        try:
            calculation = calc_price(
                Usage(input_tokens=1, output_tokens=1), model_ref=model, provider_id=provider
            )
        except LookupError:
            continue
        price = calculation.model_price
        flat = all(
            value is None or isinstance(value, Decimal | int | float)
            for value in (price.input_mtok, price.output_mtok, price.cache_read_mtok)
        )

        def flat_price(value: Any, flat: bool = flat) -> Decimal | None:
            return Decimal(str(value)) if flat and value is not None else None

        input_mtok = flat_price(price.input_mtok) or Decimal(0)
        return ModelRate(
            model=model,
            input_per_mtok=input_mtok,
            output_per_mtok=flat_price(price.output_mtok) or Decimal(0),
            cached_input_per_mtok=flat_price(price.cache_read_mtok),
            tier=tier_for_input_price(input_mtok),
            source="genai-prices",
            tiered=None if flat else price,
        )
    return None


class PriceCatalog:
    """Looks up and caches model rates; computes costs in integer nano-dollars."""

    def __init__(
        self,
        baseline_model: str = "gpt-4",
        overrides_file: Path | None = None,
        provider_id: str | None = "openai",
    ) -> None:
        self.baseline_model = baseline_model
        self.provider_id = provider_id
        self._overrides = load_overrides(overrides_file) if overrides_file else {}
        # model -> rate, oldest first: model names are free text from clients
        self._cache: OrderedDict[str, ModelRate | None] = OrderedDict()
        self._lock = threading.Lock()
        self.unknown_models: set[str] = set()  # the first LOGGED_UNKNOWN_MODELS, logged
        if self.rate(baseline_model) is None:
            raise PriceOverridesError(
                f"baseline model {baseline_model!r} has no price; pick another "
                "TOLLGATE_BASELINE_MODEL or add it to the price overrides file"
            )

    def rate(self, model: str) -> ModelRate | None:
        try:
            return self._cache[model]
        except KeyError:
            pass
        rate = self._overrides.get(model) or _lookup_genai_prices(model, self.provider_id)
        with self._lock:
            self._cache[model] = rate
            if len(self._cache) > RATE_CACHE_SIZE:
                self._cache.popitem(last=False)
            if rate is None and model not in self.unknown_models:
                if len(self.unknown_models) < LOGGED_UNKNOWN_MODELS:
                    self.unknown_models.add(model)
                    log.warning(
                        "no price known for model; its usage is flagged price_unknown "
                        "(add it to the price overrides file to cost it)",
                        extra={"model": model},
                    )
                elif len(self.unknown_models) == LOGGED_UNKNOWN_MODELS:
                    self.unknown_models.add("")  # once: say the rest are not logged
                    log.warning(
                        "more models without a price; they are not logged one by one "
                        "(tollgate_price_unknown_usage_total counts their usage)",
                        extra={"logged": LOGGED_UNKNOWN_MODELS},
                    )
        return rate

    def tier(self, model: str) -> Tier | None:
        rate = self.rate(model)
        return rate.tier if rate else None

    @staticmethod
    def _usd(rate: ModelRate, prompt: int, completion: int, cached: int) -> Decimal:
        if rate.tiered is not None:
            from genai_prices import Usage

            return Decimal(
                rate.tiered.calc_price(
                    Usage(input_tokens=prompt, output_tokens=completion, cache_read_tokens=cached)
                )["total_price"]
            )
        cached = min(max(cached, 0), prompt)
        cached_price = rate.cached_input_per_mtok
        if cached_price is None:
            cached_price = rate.input_per_mtok
        return (
            (prompt - cached) * rate.input_per_mtok
            + cached * cached_price
            + completion * rate.output_per_mtok
        ) / _MTOK

    def cost(
        self, model: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> Cost:
        """Cost of a call, its baseline cost, and the provider prompt-cache discount."""
        baseline = self.rate(self.baseline_model)
        assert baseline is not None  # checked at start-up
        baseline_nanos = event_nanos(self._usd(baseline, prompt_tokens, completion_tokens, 0))
        rate = self.rate(model)
        if rate is None:
            return Cost(0, baseline_nanos, 0, price_unknown=True, tier=None)
        actual = self._usd(rate, prompt_tokens, completion_tokens, cached_tokens)
        saved = Decimal(0)
        if cached_tokens and rate.tiered is None and rate.cached_input_per_mtok is not None:
            saved = (
                min(cached_tokens, prompt_tokens)
                * (rate.input_per_mtok - rate.cached_input_per_mtok)
                / _MTOK
            )
        return Cost(
            cost_usd_nanos=event_nanos(actual),
            baseline_cost_usd_nanos=baseline_nanos,
            prompt_cache_saved_usd_nanos=event_nanos(saved),
            price_unknown=False,
            tier=rate.tier,
        )

    def list_price_nanos(
        self, model: str, prompt_tokens: int, completion_tokens: int
    ) -> int | None:
        """What the tokens cost on ``model`` with no caching at all; None when it has no price."""
        rate = self.rate(model)
        if rate is None:
            return None
        return usd_to_nanos(self._usd(rate, prompt_tokens, completion_tokens, 0))

    def worst_case_nanos(self, model: str, prompt_tokens: int, max_output_tokens: int) -> int:
        """Upper bound of a call's cost before it runs (budget reservations).

        A model without a price is reserved at the baseline model's rates, the
        same rate the spend agent charges it at.
        """
        rate = self.rate(model) or self.rate(self.baseline_model)
        assert rate is not None  # the baseline is checked at start-up
        return usd_to_nanos(self._usd(rate, prompt_tokens, max_output_tokens, 0))
