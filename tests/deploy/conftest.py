"""What the deploy tests share: readers for deploy/, the `loraplex` parser, PromQL metric names, and one
real `loraplex serve` process serving an adapter repository."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from tests.servers import start_server

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ADMIN_TOKEN = "deploy-admin-token"


# ---------------------------------------------------------------------- deploy/ files
def yaml():
    return pytest.importorskip("yaml", reason="PyYAML (test extra) is not installed")


def load_yaml(relative: str) -> dict:
    return yaml().safe_load((DEPLOY / relative).read_text())


def load_yaml_all(relative: str) -> list[dict]:
    return [doc for doc in yaml().safe_load_all((DEPLOY / relative).read_text()) if doc is not None]


def k8s_object(kind: str, name: str) -> dict:
    """The Kubernetes object of that kind and name among the kustomization's resources."""
    for relative in load_yaml("kustomization.yaml")["resources"]:
        for doc in load_yaml_all(relative):
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name} in deploy/kustomization.yaml's resources")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_json(instruction: str) -> list[str]:
    """The exec-form (JSON array) arguments of the last such Dockerfile instruction."""
    values = [rest for word, rest in dockerfile_instructions() if word == instruction]
    assert values, f"deploy/Dockerfile has no {instruction}"
    rest = values[-1]
    if instruction == "HEALTHCHECK":
        rest = rest[rest.index("CMD") + len("CMD"):]
    return json.loads(rest)


# ---------------------------------------------------------------------- command lines
def loraplex_parser():
    from loraplex.server.cli import build_parser

    return build_parser()


def parse_loraplex(argv: list[str]):
    """Parse `loraplex ARGV` with the real CLI parser; an unknown flag or bad value fails the test."""
    parser = loraplex_parser()
    try:
        return parser.parse_args(argv)
    except SystemExit:
        raise AssertionError(f"`loraplex {shlex.join(argv)}` does not parse (see the usage message above)") from None


def loraplex_calls_in_shell(script: str) -> list[list[str]]:
    """The argv (after `loraplex`) of every `loraplex ...` command in a shell script (one command per
    line, or joined by ; && || | and if/then)."""
    calls = []
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token in {";", "&&", "||", "|", "&", "if", "then", "else", "do"}:
                if command and command[0] == "loraplex":
                    calls.append(command[1:])
                command = []
            else:
                command.append(token)
    return calls


# ---------------------------------------------------------------------- PromQL
_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression (or a Grafana label_values query) selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, regexes)
    expr = re.sub(r"label_values\(\s*([^,()]+?)\s*,[^()]*\)", r" \1 ", expr)  # Grafana: (metric, label)
    expr = re.sub(r"\{[^{}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\[\]]*\]", " ", expr)  # range and subquery windows
    expr = _LABEL_LISTS.sub(" ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = match.group()
        if word.lower() in _KEYWORDS or expr[match.end():].lstrip().startswith("("):
            continue  # an operator, or a function / aggregation name
        names.add(word)
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/loraplex.json").read_text())
    queries = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))
        queries += [target["expr"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def alert_expressions() -> list[str]:
    return [rule["expr"] for group in load_yaml("prometheus/alerts.yml")["groups"] for rule in group["rules"]]


# ---------------------------------------------------------------------- a live server
@pytest.fixture(scope="session")
def repo_layout(demo_model_dir, tmp_path_factory) -> Path:
    """<tmp>/repo: alpha, beta, gamma (one LoRA adapter, copied), broken (not an adapter), escape (a
    symlink to <tmp>/x); <tmp>/x: a valid adapter outside the repository, so that only the refusal
    rules keep '../x', absolute paths and the symlink from being served."""
    from tests.engine_support import make_lora_adapter

    top = tmp_path_factory.mktemp("adapter-repo")
    repo = top / "repo"
    repo.mkdir()
    make_lora_adapter(demo_model_dir, repo / "alpha", seed=1, r=4, target_modules=["q_proj", "v_proj"])
    for name in ("beta", "gamma", "delta"):
        shutil.copytree(repo / "alpha", repo / name)
    shutil.copytree(repo / "alpha", top / "x")
    (repo / "broken").mkdir()
    (repo / "broken" / "adapter_config.json").write_text("{not json")
    (repo / "escape").symlink_to(top / "x", target_is_directory=True)
    return repo


@pytest.fixture(scope="session")
def repo_server(demo_model_dir, repo_layout):
    """`loraplex serve --adapter-repo REPO --adapter-root REPO --admin-token ... --http-port 0` with nothing
    registered."""
    server = start_server(
        demo_model_dir, "--adapter-repo", str(repo_layout), "--adapter-root", str(repo_layout),
        "--admin-token", ADMIN_TOKEN, "--kv-cache-tokens", "1024", "--max-rank", "16", "--http-port", "0",
        startup_timeout=150.0,
    )
    yield server
    server.stop()
