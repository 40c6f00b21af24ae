"""CI's oldest leg installs pyproject's floors (``.ci/oldest_pins.py``): every core dependency and the
triton extra pinned to its ``>=`` bound, and a requirement without one stops CI instead of going untested."""

from __future__ import annotations

import importlib.util
import pathlib
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("oldest_pins", ROOT / ".ci" / "oldest_pins.py")
oldest_pins = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oldest_pins)


def test_every_core_dependency_and_triton_is_pinned_to_its_floor():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = oldest_pins.oldest_pins(project)
    names = [pin.split("==")[0] for pin in pins]
    declared = project["dependencies"] + project["optional-dependencies"]["triton"]
    assert len(pins) == len(declared) and {"torch", "triton", "numpy"} <= set(names)
    for pin, requirement in zip(pins, declared):
        name, floor = pin.split("==")
        assert requirement.replace(" ", "").startswith(f"{name}>={floor}")


@pytest.mark.parametrize("requirement", ["torch", "torch<3", "torch==2.11", "torch>=2.11; python_version<'3.12'"])
def test_a_requirement_without_a_plain_floor_is_refused(requirement):
    project = {"dependencies": [requirement], "optional-dependencies": {"triton": ["triton>=3.6,<3.10"]}}
    with pytest.raises(SystemExit, match="has no plain '>=' floor"):
        oldest_pins.oldest_pins(project)


def test_floor_and_ceiling_give_the_floor():
    project = {"dependencies": ["torch>=2.11", "numpy >= 1.26"], "optional-dependencies": {"triton": ["triton>=3.6,<3.10"]}}
    assert oldest_pins.oldest_pins(project) == ["torch==2.11", "numpy==1.26", "triton==3.6"]


def test_installed_versions_compare_by_release():
    assert oldest_pins.release("2.11.0+cu130") == oldest_pins.release("2.11") == (2, 11, 0)
    assert oldest_pins.release("1.26.4") != oldest_pins.release("1.26")
