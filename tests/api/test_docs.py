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


def documented_refusal_statuses() -> set[str]:
    """The statuses of docs/api.md's table "Refusals and their status"."""
    text = (ROOT / "docs" / "api.md").read_text()
    section = text.split("### Refusals and their status", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\|.*\| ([A-Z_]+) \|$", section, re.MULTILINE))


def test_the_refusal_table_names_every_status_the_code_returns():
    import grpc

    from loraplex.server import errors

    table = documented_refusal_statuses()
    assert table <= {code.name for code in grpc.StatusCode} - {"OK"}
    raised = {cls.code for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.EngineError)}
    servicer = (ROOT / "server" / "api" / "servicer.py").read_text()
    raised |= set(re.findall(r"StatusCode\.([A-Z_]+)", servicer))
    raised |= {"CANCELLED", "DEADLINE_EXCEEDED"}  # set by grpc when the client cancels or its deadline passes
    assert raised == table, f"in the code only: {raised - table}; in the table only: {table - raised}"
