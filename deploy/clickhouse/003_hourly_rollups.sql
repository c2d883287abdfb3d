-- Coarser and finer rollups, so that no report reads more than a few thousand rows per day.
--
-- usage_hour: usage_minute's dimensions per hour; long ranges read this, and
--   usage_minute only for the partial hours at their edges.
-- usage_user_minute: per user per minute, kept 3 days (TTL): the partial hours at
--   the edges of a by-user range ending now are read here instead of raw events.
-- downtiered_requests: the ids of requests served cheaper than asked, so routing
--   efficiency joins outcomes to a small table instead of scanning raw usage.
-- Same counting rule as 002: one insert of an event_id, one count.

CREATE TABLE IF NOT EXISTS usage_hour
(
    hour DateTime('UTC'),
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
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, feature, model_served, tier, provider, cache_hit);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hour_mv TO usage_hour AS
SELECT
    toStartOfHour(ts) AS hour,
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
GROUP BY hour, model_served, feature, tier, provider, cache_hit;

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

CREATE TABLE IF NOT EXISTS downtiered_requests
(
    ts DateTime64(3, 'UTC'),
    request_id String,
    feature LowCardinality(String)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (ts, request_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS downtiered_requests_mv TO downtiered_requests AS
SELECT ts, request_id, ifNull(feature, '') AS feature
FROM usage_events
WHERE NOT price_unknown
    AND requested_cost_usd > cost_usd + cache_saved_usd + prompt_cache_saved_usd;

-- Backfill from what the warehouse already holds (nothing, on a new one). Run migrations
-- with no sink writing (the sink migrates before it consumes): an event inserted between
-- a view's creation and its backfill would be counted twice.
INSERT INTO usage_hour
SELECT toStartOfHour(minute) AS hour, model_served, feature, tier, provider, cache_hit,
    sum(requests), sum(errors), sum(unpriced), sum(downtiered), sum(prompt_tokens),
    sum(completion_tokens), sum(cached_tokens), sum(cost_usd), sum(baseline_cost_usd),
    sum(requested_cost_usd), sum(cache_saved_usd), sum(prompt_cache_saved_usd)
FROM usage_minute
GROUP BY hour, model_served, feature, tier, provider, cache_hit;

INSERT INTO downtiered_requests
SELECT ts, request_id, ifNull(feature, '')
FROM usage_events FINAL
WHERE NOT price_unknown
    AND requested_cost_usd > cost_usd + cache_saved_usd + prompt_cache_saved_usd;

INSERT INTO usage_user_minute
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
    WHERE ts >= now() - INTERVAL 3 DAY
)
GROUP BY minute, user_id;
