"""`loraplex demo` runs to completion as a user runs it (random weights and 3 training steps, for speed;
the default settings are run by hand, see docs/api.md)."""

from __future__ import annotations

import re
import subprocess

from loraplex.server.demo import cli as demo
from tests.servers import LORAPLEX


def test_demo_runs_to_completion_and_reuses_its_cache(tmp_path):
    cache = tmp_path / "cache"
    command = [LORAPLEX, "demo", "--cache-dir", str(cache), "--device", "cpu",
               "--pretrain-steps", "0", "--train-steps", "3", "--max-new-tokens", "6"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    out = result.stdout
    assert result.returncode == 0, f"{out}\n{result.stderr}"

    for question in demo.questions():
        block = out.split(f"Q: {question}\n", 1)[1].split("\n\n", 1)[0].splitlines()
        assert [line.split()[0] for line in block] == ["(base)", *demo.ADAPTERS], block
    assert "32 requests (8 questions x base model + 3 adapters; 16 streamed, 16 unary)" in out
    steps = int(re.search(r"engine steps\s+(\d+)", out).group(1))
    mixed = float(re.search(r"distinct adapters\s+([\d.]+) per step", out).group(1))
    assert steps >= 6 and mixed > 1, out  # the adapters shared steps
    assert re.search(r"metrics: http://127\.0\.0\.1:\d+/metrics", out)

    # a second run finds everything in the cache
    logged: list[str] = []
    model = demo.ensure_model(cache, 0, log=logged.append)
    demo.ensure_adapters(cache, model, 0, 3, log=logged.append)
    assert logged == [f"demo model: cached in {model}"] + [
        f"adapter {name}: cached in {cache / f'adapters-p0-t3-{demo.data_version()}' / name}"
        for name in demo.ADAPTERS
    ]
    assert not list(cache.glob("**/*.partial"))
