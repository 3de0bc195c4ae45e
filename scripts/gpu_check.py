"""Compare the kit's PyTorch kernels with the CUDA ones on a GPU machine.

1. ``selective_scan(..., backend="torch")`` against mamba-ssm's CUDA
   ``selective_scan_fn``: forward output and the gradients of u, delta, A,
   B, C, D, z and delta_bias, float32, for several shapes and B/C forms.
2. ``deform_conv2d(..., backend="torch")`` and ``deform_conv2d_at`` against
   ``torchvision.ops.deform_conv2d`` on CUDA, when torchvision imports.
3. The DCNN branch's sparse path (every layer at the hard pixels) against
   its dense path on CUDA, outputs and input gradients, at a 10% mask, in
   float64 so that only a difference in the computation shows.

It prints the max relative errors (max |a - b| / max |b|) and writes them
with the date, the GPU name and the package versions to a JSON file. On a
machine without CUDA it prints why and exits with status 0.

Usage (after installing a CUDA torch, then mamba-ssm with
``pip install --no-build-isolation mamba-ssm`` and optionally torchvision):

    python scripts/gpu_check.py --output gpu_check.json
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch

from hurmacl_kit.branches import DCNNBranch, DCNNConfig
from hurmacl_kit.branches.deform import deform_conv2d, deform_conv2d_at
from hurmacl_kit.io import atomic_write_json
from hurmacl_kit.branches.scan import selective_scan

# (batch, channels, state, length, B/C form)
SCAN_SHAPES = (
    (2, 32, 16, 256, "shared"),
    (4, 64, 16, 1024, "shared"),
    (2, 128, 16, 4096, "shared"),
    (2, 64, 8, 512, "constant"),
    (2, 64, 16, 512, "grouped"),
)
TOLERANCE = 1e-4


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double(), reference.detach().double()
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def scan_inputs(batch, channels, state, length, form, device):
    generator = torch.Generator(device="cpu").manual_seed(0)
    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)
    projection = {
        "shared": lambda: randn(batch, state, length),
        "constant": lambda: randn(channels, state),
        "grouped": lambda: randn(batch, 2, state, length),
    }[form]
    return dict(
        u=randn(batch, channels, length), delta=randn(batch, channels, length) * 0.5,
        A=-torch.rand(channels, state, generator=generator).to(device) - 0.1,
        B=projection(), C=projection(), D=randn(channels), z=randn(batch, channels, length),
        delta_bias=randn(channels) * 0.1,
    )


def check_scan(device) -> list[dict]:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError as error:
        print(f"mamba-ssm not importable ({error}); scan check skipped")
        return []
    results = []
    for batch, channels, state, length, form in SCAN_SHAPES:
        inputs = scan_inputs(batch, channels, state, length, form, device)
        grad = torch.randn(batch, channels, length, device=device)
        outputs, gradients = {}, {}
        for name, function in (
            ("torch", lambda **kw: selective_scan(**kw, delta_softplus=True, backend="torch")),
            ("mamba_ssm", lambda **kw: selective_scan_fn(**kw, delta_softplus=True)),
        ):
            leaves = {key: value.clone().requires_grad_() for key, value in inputs.items()}
            out = function(**leaves)
            out.backward(grad)
            outputs[name] = out.detach()
            gradients[name] = {key: leaf.grad for key, leaf in leaves.items()}
        errors = {"out": relative_error(outputs["torch"], outputs["mamba_ssm"])}
        errors.update({f"d{key}": relative_error(gradients["torch"][key], gradients["mamba_ssm"][key]) for key in inputs})
        worst = max(errors.values())
        print(f"scan B={batch} D={channels} N={state} L={length} {form}: max rel err {worst:.2e}  {errors}")
        results.append(dict(batch=batch, channels=channels, state=state, length=length, form=form, errors=errors, max=worst))
    return results


def check_deform(device) -> list[dict]:
    try:
        from torchvision.ops import deform_conv2d as torchvision_deform
    except Exception as error:  # noqa: BLE001 - a torchvision built for another torch raises RuntimeError
        print(f"torchvision.ops not importable ({error}); deformable check skipped")
        return []
    results = []
    for batch, channels, size, offset_groups in ((8, 8, 96, 1), (8, 16, 128, 1), (2, 16, 64, 2)):
        generator = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(batch, channels, size, size, generator=generator).to(device)
        offset = (torch.randn(batch, 18 * offset_groups, size, size, generator=generator) * 2).to(device)
        mask = torch.rand(batch, 9 * offset_groups, size, size, generator=generator).to(device)
        weight = torch.randn(channels, channels, 3, 3, generator=generator).to(device)
        bias = torch.randn(channels, generator=generator).to(device)
        reference = torchvision_deform(x, offset, weight, bias, padding=(1, 1), mask=mask)
        dense = deform_conv2d(x, offset, weight, bias, padding=1, mask=mask, backend="torch")
        positions = torch.arange(0, batch * size * size, 7, device=device)
        at = deform_conv2d_at(
            x, offset.permute(0, 2, 3, 1).reshape(-1, offset.shape[1])[positions], weight, bias, positions,
            (size, size), padding=1, mask=mask.permute(0, 2, 3, 1).reshape(-1, mask.shape[1])[positions],
        )
        errors = {
            "dense": relative_error(dense, reference),
            "at": relative_error(at, reference.permute(0, 2, 3, 1).reshape(-1, channels)[positions]),
        }
        print(f"deform B={batch} C={channels} {size}x{size} G={offset_groups}: {errors}")
        results.append(dict(batch=batch, channels=channels, size=size, offset_groups=offset_groups, errors=errors))
    return results


def check_dcnn_sparse(device) -> list[dict]:
    results = []
    for hidden, layers in ((8, 1), (16, 2)):
        torch.manual_seed(0)
        dense = DCNNBranch(DCNNConfig(8, 8, hidden, layers, sparse_below=0.0)).to(device, torch.float64)
        with torch.no_grad():
            for layer in dense.layers:
                layer[0].offset_predictor.weight.normal_(0.0, 0.5)
        sparse = DCNNBranch(DCNNConfig(8, 8, hidden, layers, sparse_below=1.0)).to(device, torch.float64)
        sparse.load_state_dict(dense.state_dict())
        generator = torch.Generator(device="cpu").manual_seed(2)
        mask = (torch.rand(8, 128, 128, generator=generator) < 0.1).to(device)
        x = torch.softmax(torch.randn(8, 8, 128, 128, generator=generator, dtype=torch.float64), 1).to(device) * mask[:, None]
        outputs, grads = [], []
        for branch in (dense, sparse):
            leaf = x.clone().requires_grad_()
            out = branch(leaf, mask)
            out.square().mean().backward()
            outputs.append(out)
            grads.append(leaf.grad)
        errors = {"output": relative_error(outputs[1], outputs[0]), "input_grad": relative_error(grads[1], grads[0])}
        print(f"DCNN sparse vs dense, hidden {hidden}, {layers} layer(s): {errors}")
        results.append(dict(hidden=hidden, layers=layers, errors=errors))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="gpu_check.json", help="path of the JSON result")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"No CUDA device is available (torch {torch.__version__}); nothing to compare. Run this on a CUDA machine.")
        return 0

    device = torch.device("cuda")
    scan = check_scan(device)
    deform = check_deform(device)
    dcnn = check_dcnn_sparse(device)
    worst = max(
        [row["max"] for row in scan] + [max(row["errors"].values()) for row in deform + dcnn], default=0.0
    )
    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda,
        scan=scan, deform=deform, dcnn_sparse=dcnn, max_relative_error=worst, tolerance=TOLERANCE, passed=worst <= TOLERANCE,
    )
    atomic_write_json(args.output, result)
    print(f"max relative error {worst:.2e} (tolerance {TOLERANCE:g}); wrote {args.output}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
