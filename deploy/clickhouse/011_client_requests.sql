-- Requests are the client's requests (session 13's probe: 24 client requests were 31 in the
-- reports). An escalated request is two Usage rows with one request id: attempt 1, whose
-- failed answer the client never saw (status error, error_type escalated_*), and attempt 2,
-- the answer. Both were paid, so tokens and cost count every row; but the escalated-away
-- attempt is not a request, not an error the client saw, and not a call a client without
-- the router would have made, so it counts in neither requests, errors, unpriced and
-- downtiered nor the baseline and requested cost. Its cost is then a loss of routing:
-- routing savings = requested - cost - cache savings. The measures keep their names and
-- types; only the views' queries change (the reports' raw-edge SQL says the same), and the
-- hours already stored with an escalation are rebuilt after this migration
-- (app/warehouse/rollups.py, REBUILD_AFTER).

ALTER TABLE usage_minute_mv MODIFY QUERY
SELECT
    toStartOfMinute(ts) AS minute,
    model_served,
    ifNull(feature, '') AS feature,
    ifNull(tier, '') AS tier,
    ifNull(provider, '') AS provider,
    cache_hit,
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
        ts, user_id, feature, tier, provider, model_served, cache_hit, status, price_unknown,
        prompt_tokens AS in_prompt, completion_tokens AS in_completion, cached_tokens AS in_cached,
        cost_usd AS in_cost, baseline_cost_usd AS in_baseline,
        cache_saved_usd AS in_cache_saved, prompt_cache_saved_usd AS in_prompt_cache_saved,
        ifNull(requested_cost_usd, cost_usd + cache_saved_usd + prompt_cache_saved_usd) AS in_requested,
        startsWith(ifNull(error_type, ''), 'escalated_') AS superseded
    FROM usage_events
)
GROUP BY minute, model_served, feature, tier, provider, cache_hit;

ALTER TABLE usage_user_minute_mv MODIFY QUERY
SELECT
    toStartOfMinute(ts) AS minute,
    user_id,
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
    SELECT
        ts, user_id, feature, tier, provider, model_served, cache_hit, status, price_unknown,
        prompt_tokens AS in_prompt, completion_tokens AS in_completion, cached_tokens AS in_cached,
        cost_usd AS in_cost, baseline_cost_usd AS in_baseline,
        cache_saved_usd AS in_cache_saved, prompt_cache_saved_usd AS in_prompt_cache_saved,
        ifNull(requested_cost_usd, cost_usd + cache_saved_usd + prompt_cache_saved_usd) AS in_requested,
        startsWith(ifNull(error_type, ''), 'escalated_') AS superseded
    FROM usage_events
)
GROUP BY minute, user_id;

ALTER TABLE downtiered_requests_mv MODIFY QUERY
SELECT ts, request_id, ifNull(feature, '') AS feature
FROM usage_events
WHERE NOT price_unknown
    AND NOT startsWith(ifNull(error_type, ''), 'escalated_')
    AND requested_cost_usd > cost_usd + cache_saved_usd + prompt_cache_saved_usd;
