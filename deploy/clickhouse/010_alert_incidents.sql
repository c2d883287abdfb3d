-- Alert schema v2 (issue 12): alerts about the past are stored like any other, marked
-- historical; every alert states the money at stake; alerts of one incident share a key
-- and one of them is the page. The sink maps Avro fields to these columns by name; rows
-- written before this migration read the defaults (not historical, a primary alert of its
-- own incident, no impact known).

ALTER TABLE alert_events
    ADD COLUMN IF NOT EXISTS historical Bool DEFAULT false,
    ADD COLUMN IF NOT EXISTS impact_usd_per_hour Nullable(Float64),
    ADD COLUMN IF NOT EXISTS incident_key String DEFAULT '',
    ADD COLUMN IF NOT EXISTS incident_role LowCardinality(String) DEFAULT 'primary';
