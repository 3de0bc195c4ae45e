"""Timing and reporting helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch


def machine_info() -> str:
    """Return one line with the CPU model, core counts, torch version and threads."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"CPU: {model}; usable cores: {cores}; torch {torch.__version__}; "
        f"intra-op threads: {torch.get_num_threads()}; load average: {load}"
    )


def median_seconds(function: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Run ``function`` ``warmup`` times untimed, then return the median wall time of ``repeats`` runs."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def verdict(met: bool) -> str:
    return "PASS" if met else "MISS"


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    """Print a Markdown table, formatting floats to 3 significant digits."""
    def cell(value):
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(cell(value) for value in row) + " |")
