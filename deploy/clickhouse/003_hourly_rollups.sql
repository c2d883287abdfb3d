-- Hourly rollups, summed from the per-minute ones (002) as their rows are written,
-- so that long ranges read a few thousand rows per day; and the ids of requests
-- served cheaper than asked, so routing efficiency joins outcomes to a small table.

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
    toStartOfHour(minute) AS hour,
    model_served,
    feature,
    tier,
    provider,
    cache_hit,
    sum(usage_minute.requests) AS requests,
    sum(usage_minute.errors) AS errors,
    sum(usage_minute.unpriced) AS unpriced,
    sum(usage_minute.downtiered) AS downtiered,
    sum(usage_minute.prompt_tokens) AS prompt_tokens,
    sum(usage_minute.completion_tokens) AS completion_tokens,
    sum(usage_minute.cached_tokens) AS cached_tokens,
    sum(usage_minute.cost_usd) AS cost_usd,
    sum(usage_minute.baseline_cost_usd) AS baseline_cost_usd,
    sum(usage_minute.requested_cost_usd) AS requested_cost_usd,
    sum(usage_minute.cache_saved_usd) AS cache_saved_usd,
    sum(usage_minute.prompt_cache_saved_usd) AS prompt_cache_saved_usd
FROM usage_minute
GROUP BY hour, model_served, feature, tier, provider, cache_hit;

CREATE TABLE IF NOT EXISTS usage_user_hour
(
    hour DateTime('UTC'),
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
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, user_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_user_hour_mv TO usage_user_hour AS
SELECT
    toStartOfHour(minute) AS hour,
    user_id,
    sum(usage_user_minute.requests) AS requests,
    sum(usage_user_minute.errors) AS errors,
    sum(usage_user_minute.unpriced) AS unpriced,
    sum(usage_user_minute.downtiered) AS downtiered,
    sum(usage_user_minute.prompt_tokens) AS prompt_tokens,
    sum(usage_user_minute.completion_tokens) AS completion_tokens,
    sum(usage_user_minute.cached_tokens) AS cached_tokens,
    sum(usage_user_minute.cost_usd) AS cost_usd,
    sum(usage_user_minute.baseline_cost_usd) AS baseline_cost_usd,
    sum(usage_user_minute.requested_cost_usd) AS requested_cost_usd,
    sum(usage_user_minute.cache_saved_usd) AS cache_saved_usd,
    sum(usage_user_minute.prompt_cache_saved_usd) AS prompt_cache_saved_usd
FROM usage_user_minute
GROUP BY hour, user_id;

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
