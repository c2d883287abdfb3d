"""Response-cache settings (nested in ``app.settings.Settings`` as ``cache``).

Owns the typed shape and defaults of the cache's knobs and per-feature rules. It does
not own keys (:mod:`app.cache.key`), storage (:mod:`app.cache.store`) or replay
(:mod:`app.cache.replay`).
"""

from __future__ import annotations

from pydantic import BaseModel, Field

# Request fields that do not change the answer, so two bodies that differ only in them
# share a cache entry. Everything else counts, unknown fields included (a field we do not
# know might change the answer): model, messages, tools, tool_choice, response_format,
# seed, n, temperature, top_p, max_tokens, stop, penalties, logit_bias, logprobs, ...
DEFAULT_IGNORED_FIELDS: tuple[str, ...] = (
    "stream",  # a cached answer is replayed as a stream when asked
    "stream_options",  # include_usage is honoured by the replay
    "user",  # OpenAI's end-user id: abuse monitoring, not the answer
    "user_id",  # Tollgate attribution
    "session_id",  # Tollgate attribution
    "feature",  # Tollgate attribution
    "team",  # Tollgate attribution
    "metadata",  # Tollgate feature / OpenAI stored-completion tags
    "store",  # whether the provider keeps a copy
    "prompt_cache_key",  # a hint for the provider's own prompt cache
    "safety_identifier",  # OpenAI's abuse-monitoring id
)


class CacheFeatureRule(BaseModel):
    """Per-feature cache behaviour."""

    model_config = {"frozen": True, "extra": "forbid"}

    enabled: bool = Field(default=True, description="Cache this feature's answers at all.")
    cache_sampled: bool = Field(
        default=False,
        description="Also cache requests with temperature > 0 (or none: the default is 1), "
        "accepting that every caller then gets the same sample.",
    )
    shareable: bool = Field(
        default=False,
        description="Share answers across tenants of this feature (public content only).",
    )
    ttl_s: float | None = Field(default=None, gt=0, description="Overrides cache.ttl_s.")


class CacheSettings(BaseModel):
    """The response cache's settings (``Settings.cache``)."""

    model_config = {"frozen": True, "extra": "forbid"}

    enabled: bool = Field(default=False, description="Serve exact repeats from the cache.")
    ttl_s: float = Field(default=3600.0, gt=0, description="How long an answer is served.")
    max_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="Memory bound of the in-process cache (bodies + keys + per-entry overhead); "
        "least recently used entries are evicted first.",
    )
    max_entry_bytes: int = Field(
        default=1024 * 1024, ge=1, description="Answers larger than this are not stored."
    )
    ignored_fields: tuple[str, ...] = Field(
        default=DEFAULT_IGNORED_FIELDS,
        description="Request fields left out of the key (they do not change the answer).",
    )
    features: dict[str, CacheFeatureRule] = Field(
        default_factory=dict, description="Per-feature rules, by feature name."
    )

    def rule_for(self, feature: str | None) -> CacheFeatureRule:
        if feature is not None:
            rule = self.features.get(feature)
            if rule is not None:
                return rule
        return _DEFAULT_RULE


_DEFAULT_RULE = CacheFeatureRule()
