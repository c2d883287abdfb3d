from decimal import Decimal
from pathlib import Path

import pytest
from genai_prices import Usage, calc_price

from app.pricing.catalog import MAX_EVENT_NANOS, PriceCatalog, PriceOverridesError, usd_to_nanos


@pytest.fixture(scope="module")
def catalog() -> PriceCatalog:
    return PriceCatalog("gpt-4")


@pytest.mark.parametrize("model", ["gpt-4", "gpt-4o", "gpt-4o-mini", "gpt-3.5-turbo", "gpt-4.1"])
@pytest.mark.parametrize(
    ("prompt", "completion", "cached"), [(1000, 500, 0), (1234, 77, 600), (1, 1, 0)]
)
def test_costs_match_genai_prices_exactly(
    catalog: PriceCatalog, model: str, prompt: int, completion: int, cached: int
) -> None:
    expected = calc_price(
        Usage(input_tokens=prompt, output_tokens=completion, cache_read_tokens=cached),
        model_ref=model,
        provider_id="openai",
    ).total_price
    baseline = calc_price(
        Usage(input_tokens=prompt, output_tokens=completion),
        model_ref="gpt-4",
        provider_id="openai",
    ).total_price
    cost = catalog.cost(model, prompt, completion, cached)
    assert cost.cost_usd_nanos == usd_to_nanos(Decimal(expected))
    assert cost.baseline_cost_usd_nanos == usd_to_nanos(Decimal(baseline))
    assert not cost.price_unknown


def test_prompt_cache_discount_is_reported(catalog: PriceCatalog) -> None:
    cost = catalog.cost("gpt-4o", 1000, 0, 400)
    # gpt-4o: $2.50/M input, $1.25/M cached input -> 400 cached tokens save $0.0005
    assert cost.prompt_cache_saved_usd_nanos == 500_000


def test_unknown_model_is_flagged_never_a_silent_zero(catalog: PriceCatalog) -> None:
    cost = catalog.cost("tollgate-sim-unpriced", 1000, 100)
    assert cost.price_unknown is True
    assert cost.cost_usd_nanos == 0
    assert cost.baseline_cost_usd_nanos > 0
    assert "tollgate-sim-unpriced" in catalog.unknown_models


def test_tiers(catalog: PriceCatalog) -> None:
    assert catalog.tier("gpt-4") == "premium"
    assert catalog.tier("gpt-4o") == "standard"
    assert catalog.tier("gpt-4o-mini") == "economy"
    assert catalog.tier("nope-model") is None


def test_overrides_price_missing_and_negotiated_models(tmp_path: Path) -> None:
    overrides = tmp_path / "prices.yaml"
    overrides.write_text(
        "models:\n"
        "  my-finetune: {input_per_mtok: 0.30, output_per_mtok: 1.20}\n"
        "  gpt-4o: {input_per_mtok: 2, output_per_mtok: 8, cached_input_per_mtok: 1, tier: premium}\n"
    )
    catalog = PriceCatalog("gpt-4", overrides)
    mine = catalog.cost("my-finetune", 1_000_000, 1_000_000)
    assert mine.cost_usd_nanos == 1_500_000_000 and not mine.price_unknown
    assert mine.tier == "economy"
    assert catalog.cost("gpt-4o", 1_000_000, 0).cost_usd_nanos == 2_000_000_000
    assert catalog.tier("gpt-4o") == "premium"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models:\n  m: {output_per_mtok: 1}\n", "m.input_per_mtok is missing"),
        ("models:\n  m: {input_per_mtok: -1, output_per_mtok: 1}\n", "from 0 to 1,000,000"),
        ("models:\n  m: {input_per_mtok: 1, output_per_mtok: 2e6}\n", "from 0 to 1,000,000"),
        ("models:\n  m: {input_per_mtok: .nan, output_per_mtok: 1}\n", "from 0 to 1,000,000"),
        ("models:\n  m: {input_per_mtok: abc, output_per_mtok: 1}\n", "not a number"),
        ("models:\n  m: {input_per_mtok: 1, output_per_mtok: 1, tier: gold}\n", "tier='gold'"),
        ("- just a list\n", "models:"),
    ],
)
def test_bad_overrides_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(text)
    with pytest.raises(PriceOverridesError, match=message):
        PriceCatalog("gpt-4", path)


def test_baseline_without_price_is_refused() -> None:
    with pytest.raises(PriceOverridesError, match="baseline model"):
        PriceCatalog("no-such-baseline")


def test_a_cost_always_fits_its_event(tmp_path: Path) -> None:
    """Session 17's probe (F3): nothing bounded a cost in nano-dollars by what an event's
    long holds. At the highest price an override may set and 2^31-1 tokens each way, a call
    still fits; an absurd count (a broken provider's usage) is recorded at the most a long
    holds, not as an event that does not encode and is lost."""
    overrides = tmp_path / "prices.yaml"
    overrides.write_text("models:\n  dear: {input_per_mtok: 1000000, output_per_mtok: 1000000}\n")
    catalog = PriceCatalog("gpt-4", overrides)
    most = 2**31 - 1
    assert catalog.cost("dear", most, most).cost_usd_nanos < MAX_EVENT_NANOS
    assert catalog.worst_case_nanos("dear", most, most) < MAX_EVENT_NANOS
    absurd = catalog.cost("dear", 10**15, 10**15)
    assert absurd.cost_usd_nanos == MAX_EVENT_NANOS
    assert catalog.cost("gpt-4", 10**18, 10**18).baseline_cost_usd_nanos == MAX_EVENT_NANOS


def test_made_up_model_names_are_remembered_and_logged_within_bounds(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Model names are free text from clients (session 17's probe, F1): the rates remembered
    and the names logged one by one are bounded."""
    import app.pricing.catalog as catalog_module

    monkeypatch.setattr(catalog_module, "RATE_CACHE_SIZE", 50)
    monkeypatch.setattr(catalog_module, "LOGGED_UNKNOWN_MODELS", 5)
    catalog = PriceCatalog("gpt-4")
    with caplog.at_level("WARNING", logger="app.pricing.catalog"):
        for i in range(200):
            assert catalog.cost(f"made-up-{i}", 10, 10).price_unknown
    assert len(catalog._cache) <= 50
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6, lines  # five names, then one line saying the rest are not logged
    assert catalog.cost("gpt-4o", 1_000_000, 0).cost_usd_nanos > 0  # still priced
