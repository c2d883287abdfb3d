-- Rollups so that reports and dashboards never scan raw events.
--
-- Each materialized view fires once per insert into usage_events, and the sink
-- never inserts an event_id that is already there (it checks before inserting),
-- so every event is counted once. The raw tables stay the source of truth.
-- Only the per-minute rollups read raw rows; the hourly ones (003) sum them.
--
-- Measures are the same in every rollup, so a report can add a rollup's whole
-- buckets to the raw events of a partial bucket at the edges of its range:
--   requests, errors (status != ok), unpriced (model without a price),
--   downtiered (served cheaper than the model asked for),
--   tokens, cost, and for priced rows only: baseline cost, requested cost
--   (cost on the model asked for, no caching), cache and prompt-cache savings.
-- Savings decompose exactly (see app/metering/usage.py):
--   baseline - cost = (baseline - requested) + (requested - cost - cache_saved
--   - prompt_cache_saved) + prompt_cache_saved + cache_saved.

ALTER TABLE usage_events
    ADD COLUMN IF NOT EXISTS requested_cost_usd Nullable(Decimal(18, 9)) AFTER prompt_cache_saved_usd;

-- Per minute by model, feature, tier, provider and cache hit: real-time panels,
-- summaries, savings, breakdowns (except by user) and the daily trend.
CREATE TABLE IF NOT EXISTS usage_minute
(
    minute DateTime('UTC'),
    model_served LowCardinality(String),
    feature LowCardinality(String),
    tier LowCardinality(String),
    provider LowCardinality(String),
    cache_hit Bool,
    requests UInt64,
    errors UInt64,
    unpriced UInt64,
    downtiered UInt64,
    prompt_tokens UInt64,
    completion_tokens UInt64,
    cached_tokens UInt64,
    cost_usd Decimal(38, 9),
    baseline_cost_usd Decimal(38, 9),
    requested_cost_usd Decimal(38, 9),
    cache_saved_usd Decimal(38, 9),
    prompt_cache_saved_usd Decimal(38, 9)
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, feature, model_served, tier, provider, cache_hit);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_minute_mv TO usage_minute AS
SELECT
    toStartOfMinute(ts) AS minute,
    model_served,
    ifNull(feature, '') AS feature,
    ifNull(tier, '') AS tier,
    ifNull(provider, '') AS provider,
    cache_hit,
    count() AS requests,
    countIf(status != 'ok') AS errors,
    countIf(price_unknown) AS unpriced,
    countIf(NOT price_unknown AND in_requested > in_cost + in_cache_saved + in_prompt_cache_saved) AS downtiered,
    sum(in_prompt) AS prompt_tokens,
    sum(in_completion) AS completion_tokens,
    sum(in_cached) AS cached_tokens,
    sum(in_cost) AS cost_usd,
    sumIf(in_baseline, NOT price_unknown) AS baseline_cost_usd,
    sumIf(in_requested, NOT price_unknown) AS requested_cost_usd,
    sum(in_cache_saved) AS cache_saved_usd,
    sum(in_prompt_cache_saved) AS prompt_cache_saved_usd
FROM
(
    -- Renamed inputs: the measures below reuse the column names as aliases.
    SELECT
        ts, user_id, feature, tier, provider, model_served, cache_hit, status, price_unknown,
        prompt_tokens AS in_prompt, completion_tokens AS in_completion, cached_tokens AS in_cached,
        cost_usd AS in_cost, baseline_cost_usd AS in_baseline,
        cache_saved_usd AS in_cache_saved, prompt_cache_saved_usd AS in_prompt_cache_saved,
        ifNull(requested_cost_usd, cost_usd + cache_saved_usd + prompt_cache_saved_usd) AS in_requested
    FROM usage_events
)
GROUP BY minute, model_served, feature, tier, provider, cache_hit;

-- Per minute by user, kept 3 days: the by-user rollup of recent minutes, and the
-- source of the hourly per-user rollup (003) that serves longer ranges.
CREATE TABLE IF NOT EXISTS usage_user_minute
(
    minute DateTime('UTC'),
    user_id String,
    requests UInt64,
    errors UInt64,
    unpriced UInt64,
    downtiered UInt64,
    prompt_tokens UInt64,
    completion_tokens UInt64,
    cached_tokens UInt64,
    cost_usd Decimal(38, 9),
    baseline_cost_usd Decimal(38, 9),
    requested_cost_usd Decimal(38, 9),
    cache_saved_usd Decimal(38, 9),
    prompt_cache_saved_usd Decimal(38, 9)
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, user_id)
TTL minute + INTERVAL 3 DAY;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_user_minute_mv TO usage_user_minute AS
SELECT
    toStartOfMinute(ts) AS minute,
    user_id,
    count() AS requests,
    countIf(status != 'ok') AS errors,
    countIf(price_unknown) AS unpriced,
    countIf(NOT price_unknown AND in_requested > in_cost + in_cache_saved + in_prompt_cache_saved) AS downtiered,
    sum(in_prompt) AS prompt_tokens,
    sum(in_completion) AS completion_tokens,
    sum(in_cached) AS cached_tokens,
    sum(in_cost) AS cost_usd,
    sumIf(in_baseline, NOT price_unknown) AS baseline_cost_usd,
    sumIf(in_requested, NOT price_unknown) AS requested_cost_usd,
    sum(in_cache_saved) AS cache_saved_usd,
    sum(in_prompt_cache_saved) AS prompt_cache_saved_usd
FROM
(
    -- Renamed inputs: the measures below reuse the column names as aliases.
    SELECT
        ts, user_id, feature, tier, provider, model_served, cache_hit, status, price_unknown,
        prompt_tokens AS in_prompt, completion_tokens AS in_completion, cached_tokens AS in_cached,
        cost_usd AS in_cost, baseline_cost_usd AS in_baseline,
        cache_saved_usd AS in_cache_saved, prompt_cache_saved_usd AS in_prompt_cache_saved,
        ifNull(requested_cost_usd, cost_usd + cache_saved_usd + prompt_cache_saved_usd) AS in_requested
    FROM usage_events
)
GROUP BY minute, user_id;

-- Outcomes per minute by feature: cost per successful outcome without a join.
CREATE TABLE IF NOT EXISTS outcome_minute
(
    minute DateTime('UTC'),
    feature LowCardinality(String),
    outcomes UInt64,
    successes UInt64,
    value_usd Decimal(38, 9)
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, feature);

CREATE MATERIALIZED VIEW IF NOT EXISTS outcome_minute_mv TO outcome_minute AS
SELECT
    toStartOfMinute(ts) AS minute,
    ifNull(feature, '') AS feature,
    count() AS outcomes,
    countIf(outcome = 'success') AS successes,
    sum(in_value) AS value_usd
FROM (SELECT ts, feature, outcome, ifNull(value_usd, toDecimal64(0, 9)) AS in_value FROM outcome_events)
GROUP BY minute, feature;
