-- Raw events, one table per topic. ReplacingMergeTree keyed on the event's own sort key
-- with event_id last: a duplicate (identical row) can only ever collapse into its original.
-- The sink already drops known event_ids before inserting; FINAL is the safety net.
-- Money: Decimal(18, 9) USD, exact to the nano-dollar (events carry integer nano-dollars).

CREATE TABLE IF NOT EXISTS usage_events
(
    event_id String,
    ts DateTime64(3, 'UTC'),
    request_id String,
    user_id String,
    session_id Nullable(String),
    feature LowCardinality(Nullable(String)),
    team LowCardinality(Nullable(String)),
    api_key_id LowCardinality(Nullable(String)),
    source LowCardinality(String),
    provider LowCardinality(Nullable(String)),
    model_requested LowCardinality(Nullable(String)),
    model_served LowCardinality(String),
    tier LowCardinality(Nullable(String)),
    prompt_tokens UInt32,
    completion_tokens UInt32,
    cached_tokens UInt32,
    cost_usd Decimal(18, 9),
    baseline_cost_usd Decimal(18, 9),
    baseline_model LowCardinality(String),
    cache_saved_usd Decimal(18, 9),
    prompt_cache_saved_usd Decimal(18, 9),
    price_unknown Bool,
    usage_estimated Bool,
    cache_hit Bool,
    stream Bool,
    latency_ms UInt32,
    ttft_ms Nullable(UInt32),
    status LowCardinality(String),
    http_status UInt16,
    error_type LowCardinality(Nullable(String)),
    metadata Map(String, String),
    INDEX idx_event_id event_id TYPE bloom_filter GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (user_id, ts, event_id);

CREATE TABLE IF NOT EXISTS request_events
(
    event_id String,
    ts DateTime64(3, 'UTC'),
    request_id String,
    user_id String,
    session_id Nullable(String),
    feature LowCardinality(Nullable(String)),
    team LowCardinality(Nullable(String)),
    api_key_id LowCardinality(Nullable(String)),
    endpoint LowCardinality(String),
    model_requested LowCardinality(Nullable(String)),
    model_served LowCardinality(Nullable(String)),
    tier LowCardinality(Nullable(String)),
    stream Bool,
    prompt_tokens_estimated UInt32,
    max_tokens Nullable(UInt32),
    reserved_usd Decimal(18, 9),
    status LowCardinality(String),
    reason LowCardinality(Nullable(String)),
    blocked_scope Nullable(String),
    metadata Map(String, String),
    INDEX idx_event_id event_id TYPE bloom_filter GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (user_id, ts, event_id);

CREATE TABLE IF NOT EXISTS outcome_events
(
    event_id String,
    ts DateTime64(3, 'UTC'),
    request_id Nullable(String),
    session_id Nullable(String),
    user_id Nullable(String),
    feature LowCardinality(Nullable(String)),
    outcome LowCardinality(String),
    kind LowCardinality(Nullable(String)),
    value_usd Nullable(Decimal(18, 9)),
    metadata Map(String, String),
    INDEX idx_event_id event_id TYPE bloom_filter GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (ts, event_id);

CREATE TABLE IF NOT EXISTS alert_events
(
    event_id String,
    ts DateTime64(3, 'UTC'),
    alert_key String,
    kind LowCardinality(String),
    scope String,
    severity LowCardinality(String),
    status LowCardinality(String),
    score Float64,
    expected Nullable(Float64),
    observed Nullable(Float64),
    unit LowCardinality(Nullable(String)),
    window_seconds Nullable(Int64),
    first_seen DateTime64(3, 'UTC'),
    last_seen DateTime64(3, 'UTC'),
    message String,
    details Map(String, String),
    INDEX idx_event_id event_id TYPE bloom_filter GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (ts, event_id);

CREATE TABLE IF NOT EXISTS budget_decisions
(
    event_id String,
    ts DateTime64(3, 'UTC'),
    scope String,
    state LowCardinality(String),
    spent_usd Decimal(18, 9),
    limit_usd Decimal(18, 9),
    period LowCardinality(String),
    period_start DateTime64(3, 'UTC'),
    resets_at Nullable(DateTime64(3, 'UTC')),
    counted_through Nullable(DateTime64(3, 'UTC')),
    threshold Nullable(Float64),
    reason LowCardinality(Nullable(String)),
    INDEX idx_event_id event_id TYPE bloom_filter GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (scope, ts, event_id);
