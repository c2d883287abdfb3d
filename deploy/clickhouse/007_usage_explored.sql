-- Usage v4 (see schemas/, schema id 14): a call the router sent to economy by exploration
-- (routing.exploration_rate) says so. A new column only (false for older rows), so the sink
-- keeps inserting Avro bodies as they are.

ALTER TABLE usage_events
    ADD COLUMN IF NOT EXISTS explored Bool DEFAULT false;
