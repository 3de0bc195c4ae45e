"""Timing and reporting helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform
import statistics
import time
from contextlib import contextmanager
from typing import Callable

import argparse
from pathlib import Path

import numpy as np
import torch

# The checkpoint that `make demo` writes; the training and inference benchmarks add a row for it.
DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "runs" / "demo" / "checkpoint.pt"


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


def boundary_band(label: torch.Tensor, fraction: float) -> torch.Tensor:
    """Return the ``fraction`` of each slice's pixels nearest to an organ boundary.

    A trained model is uncertain along organ boundaries, in thin bands, while
    an untrained one is uncertain everywhere and its most uncertain 10% of
    pixels are scattered. The benchmarks therefore give the branches this
    band as the hard region when they time a partly hard image. A slice
    without organs gets the pixels nearest its centre.

    Args:
        label: (B, H, W) integer labels.
        fraction: Share of pixels to mark, in (0, 1].

    Returns:
        (B, H, W) bool.
    """
    from scipy import ndimage

    masks = []
    for plane in label.cpu().numpy():
        edges = ndimage.maximum_filter(plane, size=3) != ndimage.minimum_filter(plane, size=3)
        if edges.any():
            distance = ndimage.distance_transform_edt(~edges)
        else:
            rows, cols = np.indices(plane.shape)
            distance = np.hypot(rows - plane.shape[0] / 2, cols - plane.shape[1] / 2)
        count = max(1, int(round(fraction * plane.size)))
        chosen = np.argsort(distance, axis=None, kind="stable")[:count]
        mask = np.zeros(plane.size, dtype=bool)
        mask[chosen] = True
        masks.append(mask.reshape(plane.shape))
    return torch.from_numpy(np.stack(masks)).to(label.device)


@contextmanager
def forced_hard_regions(choose_mask: Callable[[torch.Tensor], torch.Tensor]):
    """Make HUR-MACL take its hard-region masks from ``choose_mask(uncertainty)`` instead of thresholding.

    The model calls ``hurmacl_kit.uncertainty.hard_region_mask(U, T)`` once
    per level. Inside this context that call returns ``choose_mask(U)``, a
    (B, H, W) bool mask of U's shape.
    """
    from hurmacl_kit import uncertainty

    original = uncertainty.hard_region_mask
    uncertainty.hard_region_mask = lambda values, threshold: choose_mask(values)
    try:
        yield
    finally:
        uncertainty.hard_region_mask = original


def paired_median_seconds(first: Callable[[], object], second: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Time ``first`` and ``second`` alternately, ``repeats`` times each, and return their medians.

    Alternating spreads a slow drift of the machine (another tenant, clock
    changes) over both, so the ratio of the two medians is steadier than
    that of two runs made one after the other.
    """
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for function, record in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            function()
            record.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--checkpoint``: a trained CPU-preset checkpoint timed in a last row when the file exists."""
    parser.add_argument(
        "--checkpoint", default=str(DEMO_CHECKPOINT),
        help="trained CPU-preset checkpoint for the last row, skipped when missing (default: %(default)s)",
    )
