"""The end of a tuner run, shared by the tune_*.py scripts: print the table block, and with --write
put it between the markers of its config file."""

from __future__ import annotations

import datetime
import re
import sys
from pathlib import Path

import torch

BEGIN = "# --- BEGIN TUNED TABLE"
END = "# --- END TUNED TABLE ---"


def provenance(card: str, totals: list[str], summed_over: str) -> str:
    import triton

    return (f"Tuned on {card}, torch {torch.__version__}, triton {triton.__version__}, "
            f"{datetime.date.today()}: {', '.join(totals)} ({summed_over}).")


def emit(block: str, path: Path, write: bool, smoke: bool) -> int:
    """Print `block`; with `write` (and not `smoke`) replace the marked block of `path`. Exit status."""
    print("\n" + block)
    if not write:
        return 0
    if smoke:
        print("--smoke: not writing a table tuned on toy shapes", file=sys.stderr)
        return 0
    text = path.read_text()
    new, n = re.subn(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    if n != 1:
        print(f"markers not found in {path}", file=sys.stderr)
        return 1
    path.write_text(new)
    print(f"wrote {path}")
    return 0
