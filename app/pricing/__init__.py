"""What a call costs: model prices and tiers (``catalog``) and token counting (``tokens``).

Money is integer nano-dollars throughout; ``catalog`` also owns the conversions to and
from USD text. It knows nothing about budgets, events or HTTP.
"""
