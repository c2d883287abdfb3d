"""Upstream providers: which ones serve a model, and one pooled HTTP session each.

Owns connections to OpenAI-compatible providers (timeouts, keep-alive pools,
API keys read from the environment once at start-up). It does not interpret
responses; ``app.gateway.pipeline`` does.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp

from app.settings import UpstreamConfig

log = logging.getLogger(__name__)

# Failures where the request certainly did not reach the provider's model,
# so retrying on another upstream cannot double-bill.
RETRYABLE_CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ClientConnectionResetError)


class UpstreamConfigError(ValueError):
    """An upstream is misconfigured (e.g. its API key variable is unset)."""


@dataclass
class Upstream:
    config: UpstreamConfig
    session: aiohttp.ClientSession
    headers: dict[str, str]
    _forward: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        self._forward = tuple(p.lower() for p in self.config.forward_headers)

    def request_headers(self, client_headers: Mapping[str, str]) -> dict[str, str]:
        """The upstream's own headers plus the client headers it is configured to receive."""
        if not self._forward:
            return self.headers
        return {**self.headers, **self.forwarded(client_headers)}

    def forwarded(self, client_headers: Mapping[str, str]) -> dict[str, str]:
        """The client headers this upstream is configured to receive."""
        if not self._forward:
            return {}
        return {
            name: value
            for name, value in client_headers.items()
            if (lowered := name.lower())
            not in ("authorization", "content-type", "content-length", "host")
            and any(fnmatch.fnmatchcase(lowered, pattern) for pattern in self._forward)
        }

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def chat_url(self) -> str:
        return self.config.base_url.rstrip("/") + "/chat/completions"


class UpstreamPool:
    def __init__(
        self,
        configs: tuple[UpstreamConfig, ...],
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 120.0,
        pool_size: int = 256,
    ) -> None:
        self.configs = configs
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self.pool_size = pool_size
        self.upstreams: list[Upstream] = []

    async def start(self) -> None:
        for config in self.configs:
            headers = {"Content-Type": "application/json"}
            if config.api_key_env:
                key = os.environ.get(config.api_key_env)
                if not key:
                    raise UpstreamConfigError(
                        f"upstream {config.name!r}: environment variable {config.api_key_env} "
                        "is not set; export the provider's API key there"
                    )
                headers["Authorization"] = f"Bearer {key}"
            session = aiohttp.ClientSession(
                timeout=self.timeout,
                connector=aiohttp.TCPConnector(limit=self.pool_size, ttl_dns_cache=300),
                skip_auto_headers=("User-Agent",),
            )
            self.upstreams.append(Upstream(config, session, headers))

    async def close(self) -> None:
        for upstream in self.upstreams:
            await upstream.session.close()
        self.upstreams.clear()

    def candidates(self, model: str) -> list[Upstream]:
        """Upstreams that serve ``model``, in configured order (first is preferred)."""
        exact = [u for u in self.upstreams if model in u.config.models]
        wildcard = [u for u in self.upstreams if "*" in u.config.models and u not in exact]
        return exact + wildcard

    def forwarded(self, model: str, client_headers: Mapping[str, str]) -> list[tuple[str, str]]:
        """The client headers a call for ``model`` sends on to its provider, by lowercase
        name (a header can change the answer: the cache keys on them)."""
        out = {
            (name.lower(), value)
            for upstream in self.tried(model)
            for name, value in upstream.forwarded(client_headers).items()
        }
        return sorted(out)

    def tried(self, model: str) -> list[Upstream]:
        """The upstreams a call for ``model`` goes to: the first that accepts the
        connection, with one retry elsewhere."""
        return self.candidates(model)[:2]

    def prompt_counter(self, model: str) -> str | None:
        """How the upstreams a call for ``model`` may go to count its prompt: their
        ``prompt_counter`` if those :meth:`tried` agree, else None (either)."""
        counters = {u.config.prompt_counter for u in self.tried(model)}
        return counters.pop() if len(counters) == 1 else None

    def known_models(self) -> list[str]:
        return sorted({m for c in self.configs for m in c.models if m != "*"})

    def provider_for(self, upstream_name: str) -> str | None:
        for config in self.configs:
            if config.name == upstream_name:
                return config.price_provider
        return None
