"""The README documents every metric the server exports, under the name Prometheus shows."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_exported_metric_is_in_the_readme():
    source = (ROOT / "server" / "api" / "metrics.py").read_text()
    names = set(re.findall(r'"(loraplex_[a-z_]+)"', source))
    assert len(names) >= 18, "metric names are no longer string literals in metrics.py: update this test"
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `(loraplex_[a-z_]+)` \| (counter|gauge|histogram)", readme, re.MULTILINE))
    documented_names = {name for name, _ in documented}
    for name in names:
        # prometheus-client appends _total to counters
        assert name in documented_names or f"{name}_total" in documented_names, f"{name} is not in the README"
