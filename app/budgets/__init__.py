"""Budget caps: policies, calendar periods, decisions, and the dispatcher's gate."""
