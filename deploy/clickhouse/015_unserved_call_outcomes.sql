-- The outcomes of calls that were never served, as one parameterized view that the reports
-- API (app/warehouse/reports.py, outcomes_of_unserved_calls) and the Grafana dashboard both
-- read, so the two show the same cost per successful outcome. Before it, the dashboard's
-- panel read outcome_minute only and counted a success posted for a call that failed
-- upstream (a feature's cost per success lower than the API's).
--
-- unserved_calls(start_ms, end_ms): (user_id, request_id) of the calls named by the outcomes
-- posted in [start_ms, end_ms) (Unix milliseconds: plain numbers, which a server takes as
-- a view's arguments where it may refuse an expression, and which Grafana's ${__from} and
-- ${__to} are) that the provider never answered. unserved_call_outcomes(start_ms,
-- end_ms): by feature, the outcomes posted in the range whose request id names a
-- call of their user (an outcome with no user is the anonymous user's, as ingest stores
-- the call) that the provider never answered: every attempt of it failed (error or
-- timeout). A call that failed and escalated to an answer was served, as was a stream its
-- client left; a call settled by estimate because its dispatcher died (dispatcher_lost)
-- may have been answered, and is not provably failed. A request id is per user. The calls
-- are looked for over the 31 days before the range (outcomes are posted minutes to days
-- after their call): the request ids (bloom filter, 014) and the users (the sorting key)
-- of the outcomes skip the granules of other calls.

CREATE VIEW IF NOT EXISTS unserved_calls AS
SELECT user_id, request_id
FROM usage_events
WHERE ts >= fromUnixTimestamp64Milli(toInt64({start_ms:UInt64}), 'UTC') - INTERVAL 31 DAY
    AND ts < fromUnixTimestamp64Milli(toInt64({end_ms:UInt64}), 'UTC')
    AND request_id IN
    (
        SELECT request_id FROM outcome_events
        WHERE ts >= fromUnixTimestamp64Milli(toInt64({start_ms:UInt64}), 'UTC')
            AND ts < fromUnixTimestamp64Milli(toInt64({end_ms:UInt64}), 'UTC')
            AND request_id IS NOT NULL
    )
    AND user_id IN
    (
        SELECT ifNull(user_id, 'anonymous') FROM outcome_events
        WHERE ts >= fromUnixTimestamp64Milli(toInt64({start_ms:UInt64}), 'UTC')
            AND ts < fromUnixTimestamp64Milli(toInt64({end_ms:UInt64}), 'UTC')
            AND request_id IS NOT NULL
    )
GROUP BY user_id, request_id
HAVING countIf(status IN ('ok', 'client_disconnected', 'dispatcher_lost')) = 0;

CREATE VIEW IF NOT EXISTS unserved_call_outcomes AS
SELECT
    ifNull(feature, '') AS feature,
    count() AS outcomes,
    countIf(outcome = 'success') AS successes,
    sum(ifNull(value_usd, toDecimal64(0, 9))) AS value_usd
FROM outcome_events FINAL
WHERE ts >= fromUnixTimestamp64Milli(toInt64({start_ms:UInt64}), 'UTC')
    AND ts < fromUnixTimestamp64Milli(toInt64({end_ms:UInt64}), 'UTC')
    AND request_id IS NOT NULL
    AND (ifNull(user_id, 'anonymous'), assumeNotNull(request_id)) IN
    (
        SELECT user_id, request_id
        FROM unserved_calls(start_ms = {start_ms:UInt64}, end_ms = {end_ms:UInt64})
    )
GROUP BY feature;
