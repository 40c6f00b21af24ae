"""The pins of CI's oldest leg, read from ``pyproject.toml`` so they cannot drift from what it declares:
every core dependency and the ``triton`` extra at the lowest version their ``>=`` bound allows.

    python .ci/oldest_pins.py          # prints e.g.  torch==2.11 einops==0.7 numpy==1.26 triton==3.6
    python .ci/oldest_pins.py --check  # fails unless the installed versions are those pins

A dependency without a ``>=`` bound has no oldest version to test: the script fails naming it.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# "name>=floor" optionally followed by ",<ceiling"; no extras, markers or other operators.
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)\s*(,\s*<\s*[0-9][0-9.]*\s*)?$")


def oldest_pins(project: dict) -> list[str]:
    """``name==floor`` for each core dependency and each requirement of the ``triton`` extra."""
    requirements = list(project["dependencies"]) + list(project["optional-dependencies"]["triton"])
    pins = []
    for requirement in requirements:
        match = REQUIREMENT.match(requirement)
        if match is None:
            raise SystemExit(f"oldest_pins: {requirement!r} in pyproject.toml has no plain '>=' floor to test")
        pins.append(f"{match.group(1)}=={match.group(2)}")
    return pins


def release(version: str) -> tuple[int, ...]:
    """The release numbers of a version, zero-padded to three: ``2.11`` and ``2.11.0+cu130`` are (2, 11, 0)."""
    numbers = tuple(int(part) for part in re.match(r"[0-9.]*[0-9]", version).group(0).split("."))
    return numbers + (0,) * (3 - len(numbers))


def main() -> None:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as file:
        project = tomllib.load(file)["project"]
    pins = oldest_pins(project)
    if sys.argv[1:] != ["--check"]:
        print(" ".join(pins))
        return
    wrong = []
    for pin in pins:
        name, floor = pin.split("==")
        installed = importlib.metadata.version(name)
        print(f"{name} {installed} (floor {floor})")
        if release(installed) != release(floor):
            wrong.append(f"{name} {installed} installed, pyproject's floor is {floor}")
    if wrong:
        raise SystemExit("oldest_pins --check: " + "; ".join(wrong))


if __name__ == "__main__":
    sys.exit(main())
