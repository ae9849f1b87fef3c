"""Compare pyproject.toml's lower bounds with the oldest releases that install together (scripts/check-floors.sh).

Reads uv's lowest-direct resolution (`name==version` lines) on stdin; prints two lines: the direct dependencies
as resolved (`name==version ...`), then the bounds that are lower than the oldest release that installs with the
rest (`name>=bound (oldest installable: version) ...`), or `-` when every bound is itself installable.
"""

from __future__ import annotations

import re
import sys
import tomllib


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version: str) -> list[int]:
    """1.2.0 == 1.2: the release numbers without trailing zeros."""
    parts = [int(part) for part in re.match(r"[0-9]+(?:\.[0-9]+)*", version)[0].split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return parts


def main() -> None:
    resolved = {}
    for line in sys.stdin:
        match = re.match(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line)
        if match:
            resolved[canonical(match[1])] = match[2]
    with open("pyproject.toml", "rb") as file:
        project = tomllib.load(file)["project"]
    bounds = {}
    for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
        match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:>=|==)\s*([0-9][^,;\s]*)", requirement)
        if match:
            bounds[canonical(match[1])] = match[2]
    print(" ".join(f"{name}=={resolved[name]}" for name in sorted(bounds) if name in resolved))
    unreal = [f"{name}>={bound} (oldest installable: {resolved[name]})" for name, bound in sorted(bounds.items())
              if name in resolved and release(resolved[name]) != release(bound)]
    print(" ".join(unreal) or "-")


if __name__ == "__main__":
    main()
