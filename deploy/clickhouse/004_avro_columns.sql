-- Raw tables take events as they are on Kafka: the sink inserts the Avro bodies themselves
-- (FORMAT Avro; ClickHouse matches fields to columns by name), so money arrives as the
-- events' integer nano-dollars and the USD Decimal columns are computed from them, exactly:
-- Decimal128 keeps all 9 decimals of nanos / 1e9. Rows written before this migration keep
-- their stored Decimal values (their *_nanos columns read 0 / NULL).

ALTER TABLE usage_events
    ADD COLUMN IF NOT EXISTS cost_usd_nanos Int64 DEFAULT 0,
    ADD COLUMN IF NOT EXISTS baseline_cost_usd_nanos Int64 DEFAULT 0,
    ADD COLUMN IF NOT EXISTS cache_saved_usd_nanos Int64 DEFAULT 0,
    ADD COLUMN IF NOT EXISTS prompt_cache_saved_usd_nanos Int64 DEFAULT 0,
    ADD COLUMN IF NOT EXISTS requested_cost_usd_nanos Nullable(Int64);

ALTER TABLE usage_events
    MODIFY COLUMN cost_usd Decimal(18, 9)
        DEFAULT CAST(toDecimal128(cost_usd_nanos, 9) / 1000000000 AS Decimal(18, 9)),
    MODIFY COLUMN baseline_cost_usd Decimal(18, 9)
        DEFAULT CAST(toDecimal128(baseline_cost_usd_nanos, 9) / 1000000000 AS Decimal(18, 9)),
    MODIFY COLUMN cache_saved_usd Decimal(18, 9)
        DEFAULT CAST(toDecimal128(cache_saved_usd_nanos, 9) / 1000000000 AS Decimal(18, 9)),
    MODIFY COLUMN prompt_cache_saved_usd Decimal(18, 9)
        DEFAULT CAST(toDecimal128(prompt_cache_saved_usd_nanos, 9) / 1000000000 AS Decimal(18, 9)),
    MODIFY COLUMN requested_cost_usd Nullable(Decimal(18, 9))
        DEFAULT CAST(toDecimal128(requested_cost_usd_nanos, 9) / 1000000000 AS Nullable(Decimal(18, 9)));

ALTER TABLE request_events
    ADD COLUMN IF NOT EXISTS reserved_usd_nanos Int64 DEFAULT 0;

ALTER TABLE request_events
    MODIFY COLUMN reserved_usd Decimal(18, 9)
        DEFAULT CAST(toDecimal128(reserved_usd_nanos, 9) / 1000000000 AS Decimal(18, 9));

ALTER TABLE outcome_events
    ADD COLUMN IF NOT EXISTS value_usd_nanos Nullable(Int64);

ALTER TABLE outcome_events
    MODIFY COLUMN value_usd Nullable(Decimal(18, 9))
        DEFAULT CAST(toDecimal128(value_usd_nanos, 9) / 1000000000 AS Nullable(Decimal(18, 9)));

ALTER TABLE budget_decisions
    ADD COLUMN IF NOT EXISTS spent_usd_nanos Int64 DEFAULT 0,
    ADD COLUMN IF NOT EXISTS limit_usd_nanos Int64 DEFAULT 0;

ALTER TABLE budget_decisions
    MODIFY COLUMN spent_usd Decimal(18, 9)
        DEFAULT CAST(toDecimal128(spent_usd_nanos, 9) / 1000000000 AS Decimal(18, 9)),
    MODIFY COLUMN limit_usd Decimal(18, 9)
        DEFAULT CAST(toDecimal128(limit_usd_nanos, 9) / 1000000000 AS Decimal(18, 9));
