"""ClickHouse: opening it and its migrations (``clickhouse``), and every report query (``reports``).

Tables are defined by the SQL migrations in ``deploy/clickhouse``; the sink
(``agents.sink``) writes them, the reports API (``app.http.reports_api``) and the CLI read
them through ``reports``.
"""
