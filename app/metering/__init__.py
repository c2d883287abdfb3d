"""Metering: who made a call and what it used, as a priced ``Usage`` record.

Owns attribution (``attribution``: API keys and headers → an ``Identity``), the one
builder of priced usage records (``usage``) and the accepted shapes of usage and outcome
reports from other services (``ingest``). The dispatcher's gateway, ``POST /v1/usage``,
the spend worker and the replay tool all build usage here, so a call costs the same
whichever way it is reported. It does not enforce budgets (``app.budgets``) nor talk
HTTP (``app.http``).
"""
