"""Developer tools: a local Kafka launcher, the provider simulator, trace replay, the local stack.

Shipped in the wheel so ``tollgate kafka``, ``tollgate simulate``, ``tollgate replay`` and
``tollgate up`` work from an install, but never imported by the service (``app``) or the
agents: ``app.cli`` imports them inside the command functions that need them, and an
import-linter contract in ``pyproject.toml`` keeps it so.
"""
