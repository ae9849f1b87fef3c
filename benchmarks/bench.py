"""`loraplex bench` as a script: the same options (see `--help`).

    .venv/bin/python benchmarks/bench.py                 # the CPU target workload
    .venv/bin/python benchmarks/bench.py --scale         # 1,000 adapters, 16 device slots, zipf
    .venv/bin/python benchmarks/bench.py --json out.json
"""

import sys

from loraplex.server.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
