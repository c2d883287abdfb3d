"""The first `make up` / `make test` installs for minutes: it must say so, not print only pip."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_install_step_says_what_it_does_and_hides_the_editable_warning() -> None:
    # -n: print the recipe without running it; -B: as if the venv were not installed yet.
    recipe = subprocess.run(
        ["make", "-n", "-B", ".venv/.installed"], cwd=REPO, capture_output=True, text=True
    ).stdout
    assert "Installing Tollgate and its dependencies" in recipe
    assert "minutes" in recipe
    assert 'PYTHONWARNINGS="ignore:Editable installation"' in recipe
