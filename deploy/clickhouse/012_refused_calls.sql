-- Calls a budget cap refused (402). Each is a blocked Request event (status 'blocked', reason
-- 'budget_exceeded', blocked_scope the cap) and no Usage event, so no report counted them: a
-- newcomer probe found 402s in neither requests nor errors. Counted per minute by the
-- dimensions spend is broken down by; the model is the one asked for (none was served), and
-- there is no provider. A refused escalation (attempt 2, whose first answer the client never
-- saw) is one too: the client was answered 402. The blocked events stored before this
-- migration are counted when it is applied (app/warehouse/rollups.py, REBUILD_AFTER).

CREATE TABLE IF NOT EXISTS refused_minute
(
    minute DateTime('UTC'),
    user_id String,
    feature LowCardinality(String),
    model LowCardinality(String),
    tier LowCardinality(String),
    refused UInt64
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, user_id, feature, model, tier);

CREATE MATERIALIZED VIEW IF NOT EXISTS refused_minute_mv TO refused_minute AS
SELECT
    toStartOfMinute(ts) AS minute,
    user_id,
    ifNull(feature, '') AS feature,
    ifNull(model_requested, '') AS model,
    ifNull(tier, '') AS tier,
    count() AS refused
FROM request_events
WHERE status = 'blocked' AND reason = 'budget_exceeded'
GROUP BY minute, user_id, feature, model, tier;
