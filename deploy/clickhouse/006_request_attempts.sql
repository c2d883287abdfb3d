-- Request v3 (see schemas/): an escalated attempt is announced by its own Request event
-- (same request_id, attempt 2), as its usage is its own Usage event. A new column only
-- (default 1 for older rows), so the sink keeps inserting Avro bodies as they are.

ALTER TABLE request_events
    ADD COLUMN IF NOT EXISTS attempt UInt16 DEFAULT 1;
