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


SHARED_SCRIPT = r"""
import asyncio, json, sys

HEAVY = ("numpy", "scipy", "river")


def stage(name, **extra):
    loaded = sorted(m for m in HEAVY if m in sys.modules)
    print(json.dumps({"stage": name, "loaded": loaded, **extra}), flush=True)


import app.cli  # noqa: E402
import app.http.server  # noqa: E402
from app.cache.config import CacheSettings  # noqa: E402
from app.gateway.savings import SavingsLevers  # noqa: E402
from app.routing.config import RoutingSettings  # noqa: E402
from app.routing.router import Router  # noqa: E402

routing = RoutingSettings(shared_learning=True, exploration_rate=0.0)
published_features = []
levers = SavingsLevers(
    routing,
    CacheSettings(enabled=True),
    publish=lambda request_id, value: published_features.append(request_id),
)
auto = {"model": "auto", "messages": [{"role": "user", "content": sys.argv[2]}]}
asyncio.run(levers.load_model())
route = levers.route("req_1", auto, None)
stage("routed_before_any_model", score=route.score)
with open(sys.argv[1], "rb") as f:
    published = f.read()
levers.use_router(Router.restore(routing, published))  # as SharedRouter installs it
route = levers.route("req_2", auto, "support")
stage("routed_with_the_learners_model", score=route.score, published=published_features)
"""


def test_a_dispatcher_that_shares_a_learner_never_loads_river_or_scipy(tmp_path: Path) -> None:
    """With shared learning the dispatcher only scores: the learner publishes a model that
    scores with numpy alone, so River and scipy (about 90 MB of the dispatcher's 165 MB once
    it routed) stay out of it, and its scores are the learner's to the last digit."""
    from app.routing.config import RoutingSettings
    from app.routing.router import Router

    question = "Prove step by step that the sum of two odd numbers is even."
    learner = Router(RoutingSettings(shared_learning=True))  # as `tollgate router-learn` builds it
    for i in range(80):  # a global and a feature model, both learned
        body = {"messages": [{"role": "user", "content": f"{question} Case {i}."}]}
        learner.learn(body, "economy", "failure" if i % 3 else "success", "support")
    published = tmp_path / "published.bin"
    published.write_bytes(learner.published_snapshot())
    body = {"model": "auto", "messages": [{"role": "user", "content": question}]}
    expected = learner.score(body, "support")[0]
    prior_only = Router(RoutingSettings()).score(body)[0]

    result = subprocess.run(
        [sys.executable, "-c", SHARED_SCRIPT, str(published), question],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    stages = {line["stage"]: line for line in map(json.loads, result.stdout.splitlines())}
    assert stages["routed_before_any_model"]["loaded"] == ["numpy"], stages
    assert stages["routed_with_the_learners_model"]["loaded"] == ["numpy"], stages
    assert stages["routed_before_any_model"]["score"] == prior_only
    assert stages["routed_with_the_learners_model"]["score"] == expected
    assert abs(expected - prior_only) > 0.01  # the learned model was used
    # the economy-routed call's features went to the learner, read without River too
    assert stages["routed_with_the_learners_model"]["published"][:1] == ["req_1"]
