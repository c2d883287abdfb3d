-- Usage v3 / Request v2 / BudgetDecision v3 (see schemas/): each upstream attempt is its own usage
-- event; the gateway may cap max_tokens to keep a budget's worst case within its limit; the
-- router's score and reason travel with the call; decisions say which usage offsets they counted.
-- New columns only (defaults for older rows), so the sink keeps inserting Avro bodies as they are.

ALTER TABLE usage_events
    ADD COLUMN IF NOT EXISTS attempt UInt16 DEFAULT 1,
    ADD COLUMN IF NOT EXISTS client_request_id Nullable(String),
    ADD COLUMN IF NOT EXISTS max_tokens_capped Nullable(UInt32),
    ADD COLUMN IF NOT EXISTS router_score Nullable(Float64),
    ADD COLUMN IF NOT EXISTS router_reason Nullable(String),
    ADD COLUMN IF NOT EXISTS escalated Bool DEFAULT false;

ALTER TABLE request_events
    ADD COLUMN IF NOT EXISTS client_request_id Nullable(String),
    ADD COLUMN IF NOT EXISTS dispatcher_id LowCardinality(Nullable(String)),
    ADD COLUMN IF NOT EXISTS boot_ts Nullable(DateTime64(3, 'UTC')),
    ADD COLUMN IF NOT EXISTS deadline_ts Nullable(DateTime64(3, 'UTC')),
    ADD COLUMN IF NOT EXISTS expected_output_tokens UInt32 DEFAULT 0,
    ADD COLUMN IF NOT EXISTS max_tokens_capped Nullable(UInt32);

ALTER TABLE budget_decisions
    ADD COLUMN IF NOT EXISTS counted_offsets Map(String, Int64);
