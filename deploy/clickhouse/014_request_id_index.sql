-- The calls an outcome names, found by request id. The outcomes report tells which outcomes
-- are of calls that failed by looking their request ids up in usage_events over the range
-- and the 31 days before it (app/warehouse/reports.py, outcomes_of_unserved_calls); ordered
-- by user and time, every row of those days was read (0.66 s at 4 million rows, growing
-- with the table). A bloom filter per granule (8192 rows, 1 in 1000 false positives, about
-- 2 bytes a row) skips the granules holding none of the ids: measured on chdb at 2 million
-- rows, 20 ids read 24 of 248 granules (half the time); ids of many users' calls spread
-- over every granule (500 and more) skip little. The rows stored before this migration are
-- indexed in the background (a mutation); until it is done their granules are read.

ALTER TABLE usage_events
    ADD INDEX IF NOT EXISTS idx_request_id request_id TYPE bloom_filter(0.001) GRANULARITY 1;

ALTER TABLE usage_events MATERIALIZE INDEX idx_request_id;
