"""The package's import graph keeps its shape (tools/house.py): no import circle, no import
running upward (each folder imports only the folders below it in docs/design.md's map: config/
nothing, algo/ nothing, the PPO loop only by its callers, ray only in distributed/ and cli.py),
no module importing another's private name, and at most 6 modules at the package root."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "house.py"


def load_house():
    spec = importlib.util.spec_from_file_location("house", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["house"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


house = load_house()


def test_no_import_circles():
    assert house.cycles(house.survey().imports) == []


def test_no_layering_rule_broken():
    assert house.broken_rules(house.survey()) == []


def test_no_private_name_imported_across_modules():
    assert house.survey().private == []


def test_the_survey_sees_a_circle_a_private_import_and_an_upward_import(tmp_path):
    """The checks can fail: a made-up package with each fault is caught."""
    package = tmp_path / "rlhf_ray"
    for folder in ("algo", "config", "ppo", "workers"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "algo" / "__init__.py").write_text("from rlhf_ray.config.ppo import Config\n")
    (package / "config" / "ppo.py").write_text(
        "def f():\n    from rlhf_ray.ppo.loop import _loop\n"
    )
    (package / "ppo" / "loop.py").write_text("import ray\nfrom rlhf_ray.config import ppo\n")
    (package / "workers" / "learner.py").write_text("from rlhf_ray.ppo import checkpoint\n")
    (package / "ppo" / "checkpoint.py").write_text("")
    found = house.survey(package)
    assert house.cycles(found.imports) == [["rlhf_ray.config.ppo", "rlhf_ray.ppo.loop"]]
    assert found.private == ["rlhf_ray.config.ppo imports rlhf_ray.ppo.loop._loop"]
    broken = house.broken_rules(found)
    assert any(b.startswith("rlhf_ray.algo imports rlhf_ray.config.ppo") for b in broken)
    assert any(b.startswith("rlhf_ray.config.ppo imports rlhf_ray.ppo.loop") for b in broken)
    assert any(b.startswith("rlhf_ray.workers.learner imports rlhf_ray.ppo") for b in broken)
    assert "rlhf_ray.ppo.loop imports ray: only distributed/ and cli.py may" in broken


def test_the_package_root_holds_a_few_modules(tmp_path):
    assert len(house.root_modules()) <= house.MAX_ROOT_MODULES
    crowded = tmp_path / "rlhf_ray"
    crowded.mkdir()
    for name in ["__init__", "cli", "errors", "types", "a", "b", "c", "d"]:
        (crowded / f"{name}.py").write_text("")
    assert len(house.root_modules(crowded)) == 7 > house.MAX_ROOT_MODULES


def test_no_file_over_500_lines_and_no_hand_packed_layout():
    found = house.survey()
    assert found.big_files == [] and found.fmt_skips == 0


def test_ruff_format_decides_the_layout():
    import subprocess

    package = TOOL.parent.parent / "rlhf_ray"
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", str(package)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_function_over_60_lines():
    assert house.survey().long_functions == []
