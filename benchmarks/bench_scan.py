"""Selective scan, forward plus backward: the kit against mambapy and mamba-ssm's reference.

All three compute the same thing from the same (B, D, L) tensors:
h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, y_t = <C_t, h_t> + D u_t,
then backpropagate one fixed output gradient to every input.

- kit: ``hurmacl_kit.branches.selective_scan(..., backend="torch")``.
- mambapy: ``mambapy.pscan.pscan`` (mambapy 1.2.0, Blelloch parallel scan)
  on the (B, L, D, N) decays exp(delta A) and drives delta B u, with y built
  as in ``mambapy.mamba.MambaBlock.selective_scan``.
- mamba-ssm ref: ``selective_scan_ref`` from mamba-ssm 2.3.2.post1's
  ``mamba_ssm/ops/selective_scan_interface.py``, a sequential loop over time.
  mamba-ssm does not install without CUDA, so the function's source is read
  from the sdist at run time (see ``mamba_ssm_source``). Fetch the sdist once:

      MAMBA_SKIP_CUDA_BUILD=TRUE pip download --no-deps --no-binary :all: \\
          --no-build-isolation mamba-ssm==2.3.2.post1 -d ~/.cache/hurmacl_kit/mamba_src

  or point ``MAMBA_SSM_SDIST`` at the .tar.gz. Without it that column is skipped.

Target: the kit at least 2x faster than the faster of the other two at L >= 1024.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import tarfile
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, median_seconds, print_table, verdict  # noqa: E402

from hurmacl_kit.branches.scan import selective_scan  # noqa: E402

SDIST_NAME = "mamba_ssm-2.3.2.post1.tar.gz"
SDIST_MEMBER = "mamba_ssm/ops/selective_scan_interface.py"
SDIST_FOLDERS = (Path.home() / ".cache" / "hurmacl_kit" / "mamba_src", Path("/tmp/mamba_src"))


def mamba_ssm_source() -> Path | None:
    """Return the mamba-ssm sdist from ``MAMBA_SSM_SDIST`` or a cache folder, or None."""
    candidates = [Path(os.environ["MAMBA_SSM_SDIST"])] if os.environ.get("MAMBA_SSM_SDIST") else []
    candidates += [folder / SDIST_NAME for folder in SDIST_FOLDERS]
    return next((path for path in candidates if path.is_file()), None)


def load_selective_scan_ref(sdist: Path):
    """Compile only ``selective_scan_ref`` from the sdist, with torch, F, rearrange and repeat in scope."""
    with tarfile.open(sdist) as archive:
        member = next(name for name in archive.getnames() if name.endswith(SDIST_MEMBER))
        source = archive.extractfile(member).read().decode()
    tree = ast.parse(source)
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "selective_scan_ref")
    namespace = {"torch": torch, "F": F, "rearrange": rearrange, "repeat": repeat}
    exec(compile(ast.Module(body=[function], type_ignores=[]), f"{sdist}:{member}", "exec"), namespace)
    return namespace["selective_scan_ref"]


def make_inputs(batch: int, channels: int, state: int, length: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    def randn(*shape):
        return torch.randn(*shape, generator=generator)
    return dict(
        u=randn(batch, channels, length),
        delta=F.softplus(randn(batch, channels, length) - 2.0),  # step sizes > 0, about 0.1
        A=-torch.rand(channels, state, generator=generator) * state - 0.5,
        B=randn(batch, state, length),
        C=randn(batch, state, length),
        D=randn(channels),
    )


def run_kit(inputs: dict) -> torch.Tensor:
    return selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"], backend="torch")


def run_mambapy(inputs: dict) -> torch.Tensor:
    from mambapy.pscan import pscan

    x = inputs["u"].transpose(1, 2)  # (B, L, D)
    delta = inputs["delta"].transpose(1, 2)  # (B, L, D)
    B = inputs["B"].transpose(1, 2)  # (B, L, N)
    C = inputs["C"].transpose(1, 2)
    decay = torch.exp(delta.unsqueeze(-1) * inputs["A"])  # (B, L, D, N)
    drive = delta.unsqueeze(-1) * B.unsqueeze(2) * x.unsqueeze(-1)  # (B, L, D, N)
    states = pscan(decay, drive)
    y = (states @ C.unsqueeze(-1)).squeeze(3) + inputs["D"] * x  # (B, L, D)
    return y.transpose(1, 2)


def forward_backward(method, inputs: dict, grad: torch.Tensor) -> None:
    leaves = {name: value.detach().requires_grad_() for name, value in inputs.items()}
    method(leaves).backward(grad)


def check_agreement(methods: dict, inputs: dict) -> dict:
    """Return each method's max relative output error against the kit on these inputs."""
    with torch.no_grad():
        kit = run_kit(inputs)
        return {name: float((method(inputs) - kit).abs().max() / kit.abs().max()) for name, method in methods.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and no L = 4096")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 3, quick 2)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--state", type=int, default=16, help="state size N")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths L (default 256 1024 4096)")
    parser.add_argument(
        "--no-ref", action="store_true",
        help="skip mamba-ssm's selective_scan_ref, a Python loop over L that takes minutes per case at L = 4096",
    )
    parser.add_argument(
        "--ref-max-length", type=int, default=1024,
        help="time mamba-ssm's reference only up to this L; above it mambapy is the faster reference (default 1024)",
    )
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 3)
    lengths = args.lengths or ((256, 1024) if args.quick else (256, 1024, 4096))
    channel_sizes = (32, 64, 128)

    print(machine_info())
    methods = {"mambapy": run_mambapy}
    sdist = None if args.no_ref else mamba_ssm_source()
    if args.no_ref:
        print("mamba-ssm ref column skipped (--no-ref)")
    elif sdist is None:
        print(f"mamba-ssm ref column skipped: {SDIST_NAME} not found (set MAMBA_SSM_SDIST; see this file's docstring)")
    else:
        reference = load_selective_scan_ref(sdist)
        methods["mamba-ssm ref"] = lambda inputs: reference(
            inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"]
        )

    rows, results = [], []
    for length in lengths:
        compared = {name: method for name, method in methods.items() if name != "mamba-ssm ref" or length <= args.ref_max_length}
        if len(compared) < len(methods):
            print(f"L={length}: mamba-ssm ref not timed (above --ref-max-length {args.ref_max_length})")
        for channels in channel_sizes:
            inputs = make_inputs(args.batch, channels, args.state, length)
            grad = torch.randn(args.batch, channels, length, generator=torch.Generator().manual_seed(1))
            errors = check_agreement(compared, inputs)
            kit_time = median_seconds(lambda: forward_backward(run_kit, inputs, grad), repeats)
            times = {name: median_seconds(lambda: forward_backward(method, inputs, grad), repeats) for name, method in compared.items()}
            fastest_other = min(times.values())
            speedup = fastest_other / kit_time
            target = speedup >= 2.0 if length >= 1024 else None
            results.append(dict(length=length, channels=channels, speedup=speedup, target=target))
            rows.append(
                [length, channels, kit_time * 1e3]
                + [times.get(name, float("nan")) * 1e3 for name in ("mambapy", "mamba-ssm ref")]
                + [speedup, "-" if target is None else verdict(target), max(errors.values())]
            )
            others = ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in times.items())
            print(f"L={length} D={channels}: kit {kit_time * 1e3:.1f} ms, {others}, speedup {speedup:.2f}x", flush=True)

    print()
    print_table(
        ["L", "D", "kit ms", "mambapy ms", "mamba-ssm ref ms", "best other / kit", "target (>= 2x, L >= 1024)", "max rel diff vs kit"],
        rows,
    )
    print(f"B={args.batch}, N={args.state}, float32, forward + backward, median of {repeats}")
    met = all(result["target"] for result in results if result["target"] is not None)
    print(f"RESULT scan: {verdict(met)} (kit >= 2x faster than the faster of mambapy and mamba-ssm ref at L >= 1024)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
