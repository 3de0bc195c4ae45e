"""Run the teaching notebooks top to bottom with papermill, then a subset again with nbval.

Each numbered notebook runs on the ``python3`` kernel with notebooks/ as its
working folder and the defaults of its ``parameters`` cell, which are the CI
settings. Executed copies go to notebooks/executed/. The script prints the
time of each notebook, names the notebook and cell of every failure, and
exits with status 1 if any notebook failed.

Usage::

    python notebooks/run_all.py                  # all notebooks, then nbval on NBVAL_SUBSET
    python notebooks/run_all.py --only 02 05     # notebooks whose names start with 02 or 05
    python notebooks/run_all.py -p device=cpu    # override a parameter in every notebook
    python notebooks/run_all.py --no-nbval --timeout 300
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import time
from pathlib import Path

import papermill as pm
from papermill.exceptions import PapermillExecutionError

NOTEBOOK_DIR = Path(__file__).resolve().parent
EXECUTED_DIR = NOTEBOOK_DIR / "executed"
KERNEL = "python3"

# nbval runs these again from their committed form (default parameters), as a
# second runner that does not inject parameters. The subset skips the
# notebooks that train or score whole volumes, to keep CI time down.
NBVAL_SUBSET = ("01", "02", "03", "04", "05")


def find_notebooks(only: list[str] | None) -> list[Path]:
    """Return the numbered notebooks, optionally only those whose names start with a prefix in ``only``."""
    notebooks = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        notebooks = [path for path in notebooks if any(path.name.startswith(prefix) for prefix in only)]
    return notebooks


def parse_parameters(items: list[str]) -> dict:
    """Parse ``NAME=VALUE`` strings; VALUE is a Python literal, or a plain string when it is not one."""
    parameters = {}
    for item in items:
        name, separator, value = item.partition("=")
        if not separator or not name.isidentifier():
            raise SystemExit(f"invalid parameter {item!r}: expected NAME=VALUE, e.g. device=cpu")
        try:
            parameters[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parameters[name] = value
    return parameters


def run_notebook(path: Path, parameters: dict, timeout: int) -> tuple[bool, float]:
    """Execute one notebook with papermill; print the failing cell on error. Returns (passed, seconds)."""
    output = EXECUTED_DIR / path.name
    started = time.perf_counter()
    try:
        pm.execute_notebook(
            str(path), str(output), parameters=parameters, kernel_name=KERNEL, cwd=str(NOTEBOOK_DIR),
            execution_timeout=timeout, progress_bar=False,
        )
    except PapermillExecutionError as error:
        seconds = time.perf_counter() - started
        print(f"FAILED {path.name} at cell {error.cell_index} of the executed copy (execution count {error.exec_count}) after {seconds:.1f} s")
        print("---- cell source ----")
        print(error.source)
        print("---- error ----")
        print(f"{error.ename}: {error.evalue}")
        print(f"executed copy with the traceback: {output}")
        return False, seconds
    return True, time.perf_counter() - started


def run_nbval(paths: list[Path], timeout: int) -> bool:
    """Run ``pytest --nbval-lax`` on the given source notebooks; return True when it passes."""
    if not paths:
        return True
    command = [
        sys.executable, "-m", "pytest", "--nbval-lax", f"--nbval-cell-timeout={timeout}",
        "-p", "no:cacheprovider", "-q", *[str(path) for path in paths],
    ]
    print("nbval:", " ".join(path.name for path in paths), flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=NOTEBOOK_DIR)
    print(f"nbval {'passed' if result.returncode == 0 else 'FAILED'} in {time.perf_counter() - started:.1f} s")
    return result.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="PREFIX", help="run only notebooks whose names start with PREFIX, e.g. 02 05")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed for one cell (default 900)")
    parser.add_argument("-p", "--parameter", action="append", default=[], metavar="NAME=VALUE",
                        help="papermill parameter for every notebook; repeatable")
    parser.add_argument("--no-nbval", action="store_true", help="skip the nbval pass")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failing notebook")
    args = parser.parse_args(argv)

    notebooks = find_notebooks(args.only)
    if not notebooks:
        print(f"no notebooks match {args.only} in {NOTEBOOK_DIR}")
        return 1
    parameters = parse_parameters(args.parameter)
    EXECUTED_DIR.mkdir(exist_ok=True)

    failed, total = [], 0.0
    for path in notebooks:
        print(f"running {path.name} ...", flush=True)
        passed, seconds = run_notebook(path, parameters, args.timeout)
        total += seconds
        print(f"{'ok' if passed else 'FAILED':>6}  {seconds:7.1f} s  {path.name}", flush=True)
        if not passed:
            failed.append(path.name)
            if args.fail_fast:
                break
    print(f"papermill: {len(notebooks) - len(failed)} of {len(notebooks)} notebooks passed in {total:.1f} s")

    if not args.no_nbval and not failed:
        subset = [path for path in notebooks if path.name[:2] in NBVAL_SUBSET]
        if not run_nbval(subset, args.timeout):
            failed.append("nbval")

    if failed:
        print("FAILED:", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
