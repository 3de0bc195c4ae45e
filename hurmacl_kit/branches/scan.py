"""Selective scan (the S6 recurrence of Mamba) in pure PyTorch, with a CUDA fast path.

For each channel d and state n the scan runs

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = <C_t, h_t> + D * u_t,   out_t = y_t * silu(z_t)  (when z is given)

``selective_scan`` takes the arguments of mamba-ssm's ``selective_scan_fn``
(mamba_ssm.ops.selective_scan_interface, mamba-ssm 2.x) with the same meaning,
so either can replace the other. On CUDA with mamba-ssm installed it calls
that kernel; everywhere else it runs the chunked scan below.

The chunked scan is exact and stays finite for long sequences and large
delta: it only multiplies decays exp(delta * A) <= 1 together, never divides
by them, so nothing overflows and an underflow to 0 is the true limit.
Inside a chunk of K steps all chunks advance together (K vectorised steps).
A second pass carries each chunk's final state into the next (L / K steps),
and one multiply-add corrects every state. The backward pass is the same
scan run in reverse (``_LinearScan``), so autograd stores only the decays
and the states.

References:
    A. Gu and T. Dao, "Mamba: Linear-Time Sequence Modeling with Selective
    State Spaces", 2023, arXiv:2312.00752.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str = "auto",
):
    """Run the selective scan with mamba-ssm's ``selective_scan_fn`` arguments.

    Args:
        u: Input, (B, D, L).
        delta: Step sizes, (B, D, L).
        A: State matrix diagonal, (D, N), real and normally negative.
        B: Input projection, (D, N) constant, (B, N, L) or (B, G, N, L).
        C: Output projection, same forms as ``B``.
        D: Skip connection, (D,).
        z: Gate, (B, D, L). The output is multiplied by silu(z).
        delta_bias: Added to ``delta`` before the softplus, (D,).
        delta_softplus: Apply softplus to ``delta``.
        return_last_state: Also return the final state, (B, D, N).
        backend: "auto" (mamba-ssm on CUDA when importable, else PyTorch),
            "torch" or "mamba_ssm".

    Returns:
        ``out`` (B, D, L) in the dtype of ``u``, or ``(out, last_state)``.

    Raises:
        ValueError: On shape mismatches, complex ``A`` or an unknown backend.
        RuntimeError: If ``backend="mamba_ssm"`` but it cannot run here.
    """
    if backend not in ("auto", "torch", "mamba_ssm"):
        raise ValueError(f"unknown selective_scan backend {backend!r}; use 'auto', 'torch' or 'mamba_ssm'")

    kernel = _mamba_ssm_kernel() if backend != "torch" and u.is_cuda else None
    if backend == "mamba_ssm" and kernel is None:
        raise RuntimeError(
            "backend='mamba_ssm' needs CUDA tensors and an importable mamba_ssm; "
            "install mamba-ssm on a CUDA machine (see README) or use backend='torch'"
        )
    if kernel is not None:
        return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    return _selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    # u, delta, z: (B, D, L); A: (D, N); B, C: (D, N) | (B, N, L) | (B, G, N, L)
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    compute_dtype = torch.float64 if dtype_in == torch.float64 else torch.float32
    batch, channels, length = u.shape

    u = u.to(compute_dtype)
    delta = delta.to(compute_dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute_dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    # Time-major layout (L, B, D, N) so that each scan step reads one contiguous slab.
    delta_t = delta.permute(2, 0, 1)  # (L, B, D)
    u_t = u.permute(2, 0, 1)  # (L, B, D)
    B_t = _time_major(B, channels, compute_dtype)  # (L, B, D or 1, N)
    C_t = _time_major(C, channels, compute_dtype)  # (L, B, D or 1, N)

    decay = torch.exp(delta_t.unsqueeze(-1) * A.to(compute_dtype))  # (L, B, D, N)
    drive = (delta_t * u_t).unsqueeze(-1) * B_t  # (L, B, D, N)
    states = linear_scan(decay, drive)  # (L, B, D, N)

    y = (states * C_t).sum(-1)  # (L, B, D)
    y = y.permute(1, 2, 0)  # (B, D, L)
    if D is not None:
        y = y + u * D.to(compute_dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute_dtype))

    out = y.to(dtype_in)
    if return_last_state:
        return out, states[-1]
    return out


def _time_major(projection: torch.Tensor, channels: int, dtype: torch.dtype) -> torch.Tensor:
    projection = projection.to(dtype)
    if projection.dim() == 2:  # (D, N): the same for every step and sample
        return projection[None, None]  # (1, 1, D, N)
    if projection.dim() == 3:  # (B, N, L)
        return projection.permute(2, 0, 1).unsqueeze(2)  # (L, B, 1, N)
    groups = projection.shape[1]  # (B, G, N, L): channel d uses group d // (D / G)
    expanded = projection.repeat_interleave(channels // groups, dim=1)  # (B, D, N, L)
    return expanded.permute(3, 0, 1, 2)  # (L, B, D, N)


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, seqlen), got shape {tuple(u.shape)}")
    batch, channels, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta shape {tuple(delta.shape)} must equal u shape {tuple(u.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported by the PyTorch scan; pass a real (dim, dstate) A")
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"A must be (dim={channels}, dstate), got shape {tuple(A.shape)}")
    state = A.shape[1]

    for name, projection in (("B", B), ("C", C)):
        valid = {
            2: projection.shape == (channels, state),
            3: projection.shape == (batch, state, length),
            4: projection.dim() == 4
            and projection.shape[0] == batch
            and projection.shape[2:] == (state, length)
            and channels % projection.shape[1] == 0,
        }.get(projection.dim(), False)
        if not valid:
            raise ValueError(
                f"{name} shape {tuple(projection.shape)} is invalid; expected ({channels}, {state}), "
                f"({batch}, {state}, {length}) or ({batch}, groups, {state}, {length}) with groups dividing {channels}"
            )

    for name, vector in (("D", D), ("delta_bias", delta_bias)):
        if vector is not None and vector.shape != (channels,):
            raise ValueError(f"{name} must have shape ({channels},), got {tuple(vector.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z shape {tuple(z.shape)} must equal u shape {tuple(u.shape)}")


def linear_scan(decay: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:
    """Solve h_t = decay_t * h_{t-1} + drive_t along dim 0, with h_{-1} = 0.

    Args:
        decay: (L, ...) multipliers, normally in [0, 1].
        drive: (L, ...) additive terms, same shape.

    Returns:
        States h, (L, ...).
    """
    return _LinearScan.apply(decay, drive)


class _LinearScan(torch.autograd.Function):
    """First-order linear recurrence with a hand-written backward pass.

    With G_t the total gradient of h_t, G_t = grad_t + decay_{t+1} G_{t+1},
    which is the same recurrence run backwards in time. Then
    d drive_t = G_t and d decay_t = G_t * h_{t-1}.
    """

    @staticmethod
    def forward(ctx, decay: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:
        states = _chunked_scan(decay, drive)
        ctx.save_for_backward(decay, states)
        return states

    @staticmethod
    def backward(ctx, grad_states: torch.Tensor):
        decay, states = ctx.saved_tensors

        next_decay = torch.cat([decay[1:], torch.zeros_like(decay[:1])])
        total = _chunked_scan(next_decay.flip(0), grad_states.flip(0)).flip(0)

        grad_drive = total
        previous = torch.cat([torch.zeros_like(states[:1]), states[:-1]])
        grad_decay = total * previous
        return grad_decay, grad_drive


def _chunked_scan(decay: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:
    """Scan along dim 0 in chunks. No autograd: ``_LinearScan`` wraps it."""
    shape = drive.shape
    length = shape[0]
    if length == 0:
        return drive.clone()
    decay = decay.expand(shape).reshape(length, -1)  # (L, M)
    drive = drive.reshape(length, -1)  # (L, M)
    width = drive.shape[1]

    chunk = _chunk_length(length)
    num_chunks = math.ceil(length / chunk)
    padding = num_chunks * chunk - length
    if padding:
        decay = F.pad(decay, (0, 0, 0, padding), value=1.0)
        drive = F.pad(drive, (0, 0, 0, padding), value=0.0)
    decay = decay.reshape(num_chunks, chunk, width)
    drive = drive.reshape(num_chunks, chunk, width)

    # 1. Scan inside every chunk at once, each chunk starting from a zero state.
    states = torch.empty_like(drive)
    states[:, 0] = drive[:, 0]
    for step in range(1, chunk):
        torch.addcmul(drive[:, step], decay[:, step], states[:, step - 1], out=states[:, step])
    if num_chunks == 1:
        return states.reshape(-1, width)[:length].reshape(shape)

    # 2. Carry each chunk's final state into the next chunk, sequentially over chunks.
    within = torch.cumprod(decay, dim=1)  # (chunks, K, M): decay from the chunk start
    carry = torch.zeros(num_chunks, width, dtype=drive.dtype, device=drive.device)
    for index in range(1, num_chunks):
        previous_end = states[index - 1, -1] + within[index - 1, -1] * carry[index - 1]
        carry[index] = previous_end

    # 3. Add the carried state, decayed to each step, to the local states.
    states.addcmul_(within, carry.unsqueeze(1))
    return states.reshape(-1, width)[:length].reshape(shape)


def _chunk_length(length: int) -> int:
    # About sqrt(L) balances the two Python loops (K steps and L / K chunks).
    return max(8, min(256, 1 << max(0, math.ceil(math.log2(math.sqrt(length))))))


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Run the selective scan one step at a time in float64.

    A plain loop over time, kept as the ground truth for tests and for the
    teaching notebook. Same arguments as ``selective_scan``; returns float64.
    """
    u, delta, A = u.double(), delta.double(), A.double()
    B, C = B.double(), C.double()
    batch, channels, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B_t = _time_major(B, channels, torch.float64)
    C_t = _time_major(C, channels, torch.float64)

    state = u.new_zeros(batch, channels, A.shape[1])
    outputs = []
    for t in range(length):
        step_B = B_t[min(t, B_t.shape[0] - 1)]
        step_C = C_t[min(t, C_t.shape[0] - 1)]
        decay = torch.exp(delta[:, :, t, None] * A)
        state = decay * state + (delta[:, :, t] * u[:, :, t])[..., None] * step_B
        outputs.append((state * step_C).sum(-1))
    y = torch.stack(outputs, dim=-1)

    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return y


def _mamba_ssm_kernel():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


def mamba_ssm_available() -> bool:
    """Return True when mamba-ssm's CUDA selective scan can be used here."""
    return torch.cuda.is_available() and _mamba_ssm_kernel() is not None
