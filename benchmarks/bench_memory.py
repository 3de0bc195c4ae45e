"""Peak resident memory of training at batch 8, one fresh process per configuration.

Each configuration runs in its own subprocess (this file with ``--child``):
it loads one real batch of 128 x 128 OpenKBP slices, builds the model and
runs 2 training steps as ``bench_training_step`` does (T = 0.001 on the
untrained model for 100% hard, the organ-boundary band for 10%). The parent reads the
child's peak resident set size from ``resource.getrusage(RUSAGE_CHILDREN)``
(Linux reports ``ru_maxrss`` in KiB). The peak includes the Python
interpreter, torch and the loaded cases. Target: at most 4 GiB.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, print_table, verdict  # noqa: E402

GIB = 1024**3


def child(ablation: str, sizes: str, fraction: float, batch_size: int) -> None:
    from contextlib import nullcontext

    from bench_training_step import SIZES, band_masks, build, load_batch, training_step
    from common import forced_hard_regions

    batch = load_batch(batch_size)
    model, optimizer = build(ablation, SIZES[sizes], batch["image"].shape[1])
    masks = band_masks(batch["label"], fraction) if fraction < 1.0 else None
    with forced_hard_regions(lambda values: masks[tuple(values.shape[-2:])]) if masks else nullcontext():
        for _ in range(2):
            training_step(model, optimizer, batch["image"], batch["label"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU preset only")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--child", nargs=3, metavar=("ABLATION", "SIZES", "FRACTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], float(args.child[2]), args.batch)
        return 0

    print(machine_info())
    rows, met = [], True
    runs = [("unet", "default", 1.0)]
    for sizes in ("cpu preset",) if args.quick else ("cpu preset", "default"):
        runs += [("hurmacl", sizes, 0.1), ("hurmacl", sizes, 1.0)]
    for ablation, sizes, fraction in runs:
        # A parent process per configuration, so its RUSAGE_CHILDREN covers one child only.
        command = [sys.executable, "-c", _PARENT, str(Path(__file__).resolve()), ablation, sizes, str(fraction), str(args.batch)]
        peak = float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip())
        met = met and peak <= 4 * GIB
        rows.append([ablation, sizes, f"{fraction:.0%}", peak / GIB, verdict(peak <= 4 * GIB)])
        print(f"{ablation} {sizes} {fraction:.0%}: {peak / GIB:.2f} GiB", flush=True)

    print()
    print_table(["model", "sizes", "hard fraction", "peak RSS GiB", "target <= 4 GiB"], rows)
    print(f"training, batch {args.batch}, 128 x 128, 2 steps per process")
    print(f"RESULT memory: {verdict(met)} (peak resident memory of training at most 4 GiB)")
    return 0


_PARENT = """
import resource, subprocess, sys
script, ablation, sizes, fraction, batch = sys.argv[1:]
subprocess.run([sys.executable, script, "--batch", batch, "--child", ablation, sizes, fraction], check=True, capture_output=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


if __name__ == "__main__":
    sys.exit(main())
