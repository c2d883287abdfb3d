-- Spend by team. Every Usage event carries the team it is attributed to (a header, the body
-- or the API key's) and teams have budget caps (team:<id>), but no rollup kept the team, so
-- a breakdown by team would have scanned raw events (a newcomer probe found none offered).
-- Its own rollups, as by user (002, 003): another cardinality than the model and feature
-- rollup. Teams are few, so the minutes are kept as long as usage_minute's (no TTL, unlike
-- the per-user minutes). A call with no team is ''. The measures and the view's query are
-- those of usage_minute_mv since 011 (an escalated-away attempt is paid, not a request).
-- Calls a budget cap refused carry their team too (a blocked Request event), counted per
-- minute by team as 012 counts them by the other dimensions. The events stored before this
-- migration are counted when it is applied (app/warehouse/rollups.py, REBUILD_AFTER).

CREATE TABLE IF NOT EXISTS usage_team_minute
(
    minute DateTime('UTC'),
    team LowCardinality(String),
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
ORDER BY (minute, team);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_team_minute_mv TO usage_team_minute AS
SELECT
    toStartOfMinute(ts) AS minute,
    ifNull(team, '') AS team,
    countIf(NOT superseded) AS requests,
    countIf(status != 'ok' AND NOT superseded) AS errors,
    countIf(price_unknown AND NOT superseded) AS unpriced,
    countIf(NOT superseded AND NOT price_unknown
        AND in_requested > in_cost + in_cache_saved + in_prompt_cache_saved) AS downtiered,
    sum(in_prompt) AS prompt_tokens,
    sum(in_completion) AS completion_tokens,
    sum(in_cached) AS cached_tokens,
    sum(in_cost) AS cost_usd,
    sumIf(in_baseline, NOT price_unknown AND NOT superseded) AS baseline_cost_usd,
    sumIf(in_requested, NOT price_unknown AND NOT superseded) AS requested_cost_usd,
    sum(in_cache_saved) AS cache_saved_usd,
    sum(in_prompt_cache_saved) AS prompt_cache_saved_usd
FROM
(
    -- Renamed inputs: the measures below reuse the column names as aliases.
    SELECT
        ts, team, status, price_unknown,
        prompt_tokens AS in_prompt, completion_tokens AS in_completion, cached_tokens AS in_cached,
        cost_usd AS in_cost, baseline_cost_usd AS in_baseline,
        cache_saved_usd AS in_cache_saved, prompt_cache_saved_usd AS in_prompt_cache_saved,
        ifNull(requested_cost_usd, cost_usd + cache_saved_usd + prompt_cache_saved_usd)
            AS in_requested,
        startsWith(ifNull(error_type, ''), 'escalated_') AS superseded
    FROM usage_events
)
GROUP BY minute, team;

CREATE TABLE IF NOT EXISTS usage_team_hour
(
    hour DateTime('UTC'),
    team LowCardinality(String),
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
ORDER BY (hour, team);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_team_hour_mv TO usage_team_hour AS
SELECT
    toStartOfHour(minute) AS hour,
    team,
    sum(usage_team_minute.requests) AS requests,
    sum(usage_team_minute.errors) AS errors,
    sum(usage_team_minute.unpriced) AS unpriced,
    sum(usage_team_minute.downtiered) AS downtiered,
    sum(usage_team_minute.prompt_tokens) AS prompt_tokens,
    sum(usage_team_minute.completion_tokens) AS completion_tokens,
    sum(usage_team_minute.cached_tokens) AS cached_tokens,
    sum(usage_team_minute.cost_usd) AS cost_usd,
    sum(usage_team_minute.baseline_cost_usd) AS baseline_cost_usd,
    sum(usage_team_minute.requested_cost_usd) AS requested_cost_usd,
    sum(usage_team_minute.cache_saved_usd) AS cache_saved_usd,
    sum(usage_team_minute.prompt_cache_saved_usd) AS prompt_cache_saved_usd
FROM usage_team_minute
GROUP BY hour, team;

CREATE TABLE IF NOT EXISTS refused_team_minute
(
    minute DateTime('UTC'),
    team LowCardinality(String),
    refused UInt64
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, team);

CREATE MATERIALIZED VIEW IF NOT EXISTS refused_team_minute_mv TO refused_team_minute AS
SELECT
    toStartOfMinute(ts) AS minute,
    ifNull(team, '') AS team,
    count() AS refused
FROM request_events
WHERE status = 'blocked' AND reason = 'budget_exceeded'
GROUP BY minute, team;
