"""How fast `anovl --help` answers, as a ratio to `python -c "import torch"`, both measured in this run.

    python benchmarks/cli_startup.py [--repeats 5]

The target (issue 13): `anovl --help` within 2 s, i.e. without importing torch or Lightning; the ratio
shows it independent of the machine (well below 1: the help costs less than importing torch alone).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "anovl --help": [sys.executable, "-m", "anovl.cli", "--help"],
    "anovl test --help": [sys.executable, "-m", "anovl.cli", "test", "--help"],
}


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command; the median is reported")
    args = parser.parse_args()
    for command in COMMANDS.values():  # warm the file cache once, unmeasured
        wall_time(command)
    times = {
        name: statistics.median(wall_time(command) for _ in range(args.repeats)) for name, command in COMMANDS.items()
    }
    reference = times["import torch"]
    for name, seconds in times.items():
        print(f"{name:<20} {seconds:6.2f} s   ratio to import torch: {seconds / reference:5.2f}")
    verdict = "meets" if times["anovl --help"] < 2 else "MISSES"
    print(f"anovl --help {verdict} the 2 s target on this machine")


if __name__ == "__main__":
    main()
