"""Run every benchmark in its own process and print each target's PASS/MISS line.

Usage: ``python benchmarks/run_all.py [--quick]``. Each script also runs on
its own; see its docstring for the setup. Timings on shared machines are
noisy: compare ratios measured in the same process, not absolute times.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import machine_info

SCRIPTS = (
    "bench_scan.py",
    "bench_deform.py",
    "bench_training_step.py",
    "bench_inference.py",
    "bench_memory.py",
    "bench_model_size.py",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    args = parser.parse_args()
    folder = Path(__file__).resolve().parent
    print(machine_info())
    print(time.strftime("date: %Y-%m-%d %H:%M %Z"))

    verdicts, failures = [], []
    for script in SCRIPTS:
        print(f"\n===== {script} =====", flush=True)
        command = [sys.executable, str(folder / script)] + (["--quick"] if args.quick else [])
        completed = subprocess.run(command, capture_output=True, text=True)
        print(completed.stdout, end="")
        if completed.returncode != 0:
            failures.append(script)
            print(completed.stderr[-3000:], end="")
        verdicts += [line for line in completed.stdout.splitlines() if line.startswith("RESULT")]

    print("\n===== summary =====")
    for line in verdicts:
        print(line)
    for script in failures:
        print(f"FAILED to run: {script}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
