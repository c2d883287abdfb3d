"""The dispatcher does not load the router's learning stack (numpy, River, scipy: about 100 MB of
resident memory) until a routed request needs the failure model.

A fresh interpreter (a subprocess, so nothing another test imported counts) imports what
``tollgate serve`` imports, builds the savings levers as the dispatcher does, answers a request
naming its model, then a ``model: "auto"`` request; ``sys.modules`` is read after each step.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import asyncio, json, sys

HEAVY = ("numpy", "scipy", "river")


def stage(name):
    print(json.dumps({"stage": name, "loaded": sorted(m for m in HEAVY if m in sys.modules)}),
          flush=True)


import app.cli  # noqa: E402  (what `tollgate serve` imports, in its order)
import app.http.server  # noqa: E402

stage("imported")
from app.cache.config import CacheSettings  # noqa: E402
from app.gateway.savings import SavingsLevers  # noqa: E402
from app.routing.config import RoutingSettings  # noqa: E402

levers = SavingsLevers(RoutingSettings(), CacheSettings(enabled=True))
stage("built")
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
plain = {"model": "gpt-4o", "messages": MESSAGES}
route = levers.route("req_1", plain, None)
assert not route.routed and route.tier == "standard", route
levers.cache_plan(plain, app.http.server.Identity("ann"), None)
stage("not_routed")
auto = {"model": "auto", "messages": MESSAGES}
assert levers.model_needed(auto, None)
asyncio.run(levers.load_model())
route = levers.route("req_2", auto, None)
assert route.routed and route.tier == "economy", route
stage("routed")
"""


def test_the_learning_stack_loads_only_for_a_routed_request() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    stages = {
        line["stage"]: line["loaded"]
        for line in map(json.loads, result.stdout.splitlines())
        if isinstance(line, dict)
    }
    assert stages.get("imported") == [], f"importing the dispatcher loads {stages}"
    assert stages.get("built") == [], stages
    assert stages.get("not_routed") == [], stages
    assert result.returncode == 0, result.stderr
    # the routed request did need the model: the same check would see it loaded
    assert set(stages["routed"]) >= {"numpy", "river"}, stages
