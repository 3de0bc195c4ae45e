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
The state entering each chunk follows the same recurrence over chunks and
is solved recursively, then one multiply-add corrects every state. The
custom backward pass (``_SelectiveScan``) runs the same scan in reverse and
recomputes the decays, so autograd stores only the inputs and the states.
``linear_scan`` exposes the plain recurrence h_t = a_t h_{t-1} + b_t.

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
    channels = u.shape[1]

    u = u.to(compute_dtype)
    delta = delta.to(compute_dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute_dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    # Time-major layout (L, B, D, N) so that each scan step reads one contiguous slab.
    B_t = _time_major(B, channels, compute_dtype)  # (L, B, 1, N) | (1, 1, D, N) | (L, B, D, N)
    C_t = _time_major(C, channels, compute_dtype)
    y_t, last_state = _SelectiveScan.apply(
        u.permute(2, 0, 1), delta.permute(2, 0, 1), A.to(compute_dtype), B_t, C_t, _FORMS[B.dim()], _FORMS[C.dim()]
    )  # (L, B, D), (B, D, N)

    y = y_t.permute(1, 2, 0)  # (B, D, L)
    if D is not None:
        y = y + u * D.to(compute_dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute_dtype))

    out = y.to(dtype_in)
    if return_last_state:
        return out, last_state
    return out


# Time-major form of B and C by their input rank: (D, N), (B, N, L) or (B, G, N, L).
_FORMS = {2: "constant", 3: "shared", 4: "channel"}


class _SelectiveScan(torch.autograd.Function):
    """y_t = <C_t, h_t> with h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, all in time-major layout.

    Autograd stores only the inputs and the states h. The decays exp(delta A)
    are recomputed in the backward pass, which runs the same chunked scan in
    reverse: with G_t the total gradient of h_t,
    G_t = C_t dy_t + exp(delta_{t+1} A) G_{t+1}. Then d(delta_t u_t B_t) = G_t
    and d exp(delta_t A) = G_t h_{t-1}.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, B_form, C_form):
        # u, delta: (L, B, D); A: (D, N); B, C: (1, 1, D, N) | (L, B, 1, N) | (L, B, D, N), see _FORMS
        u = u.contiguous()
        delta = delta.contiguous()
        states = (delta * u).unsqueeze(-1) * B  # (L, B, D, N), the drive, scanned in place
        _scan_(states, delta, A, reverse=False)
        y = _contract_state(states, C, C_form)  # (L, B, D)

        ctx.forms = (B_form, C_form)
        ctx.save_for_backward(u, delta, A, B, C, states)
        return y, states[-1].clone()

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        u, delta, A, B, C, states = ctx.saved_tensors
        B_form, C_form = ctx.forms
        grad_y = grad_y.contiguous()  # (L, B, D)

        # 1. Total state gradient G, by the scan run backwards in time.
        total = grad_y.unsqueeze(-1) * C  # (L, B, D, N)
        if grad_last is not None:
            total[-1] += grad_last
        next_delta = torch.cat([delta[1:], torch.zeros_like(delta[:1])])
        next_decay = _scan_(total, next_delta, A, reverse=True)  # next_decay[t] = exp(delta_{t+1} A)

        # 2. Gradients through y = <C, h> and through the drive delta * u * B.
        grad_C = _contract_projection(states, grad_y, C_form)
        drive_scale = delta * u
        grad_B = _contract_projection(total, drive_scale, B_form)
        grad_scale = _contract_state(total, B, B_form)  # (L, B, D): d(delta * u)
        grad_u = grad_scale * delta
        grad_delta = grad_scale * u

        # 3. Gradients through the decays: d exp(delta_t A) = G_t h_{t-1}, for t >= 1 since h_{-1} = 0.
        weighted = total[1:].mul_(states[:-1]).mul_(next_decay[:-1])  # (L-1, B, D, N) = G_t h_{t-1} exp(delta_t A)
        grad_delta[1:] += torch.linalg.vecdot(weighted, A)
        grad_A = _sum_over_steps(weighted, delta[1:])
        return grad_u, grad_delta, grad_A, grad_B, grad_C, None, None


# The contractions below use batched row-vector products (bmm with a
# (L*B, 1, K) left factor) or torch.linalg.vecdot. On 2 CPU cores with torch
# 2.13 they ran 3-10x faster than the equivalent torch.einsum calls, which
# copied the (L, B, D, N) operand.


def _contract_state(states: torch.Tensor, projection: torch.Tensor, form: str) -> torch.Tensor:
    """Return sum_n states * projection, (L, B, D), without a (L, B, D, N) temporary where possible."""
    length, batch, channels, state = states.shape
    if form == "shared":  # (L, B, 1, N)
        rows = projection.reshape(length * batch, 1, state)
        return torch.bmm(rows, states.view(length * batch, channels, state).transpose(1, 2)).view(length, batch, channels)
    return torch.linalg.vecdot(states, projection)  # (1, 1, D, N) or (L, B, D, N)


def _contract_projection(states: torch.Tensor, per_channel: torch.Tensor, form: str) -> torch.Tensor:
    """Return the gradient of a projection: sum of states * per_channel over the axes it broadcasts along."""
    length, batch, channels, state = states.shape
    if form == "shared":  # (L, B, 1, N)
        rows = per_channel.reshape(length * batch, 1, channels)
        return torch.bmm(rows, states.view(length * batch, channels, state)).view(length, batch, 1, state)
    if form == "constant":  # (1, 1, D, N)
        return _sum_over_steps(states, per_channel)[None, None]
    return states * per_channel.unsqueeze(-1)


def _sum_over_steps(states: torch.Tensor, per_channel: torch.Tensor) -> torch.Tensor:
    """Return sum over (L, B) of states * per_channel[..., None], (D, N)."""
    length, batch, channels, state = states.shape
    rows = per_channel.reshape(length * batch, channels).t().reshape(channels, 1, length * batch)
    return torch.bmm(rows, states.view(length * batch, channels, state).transpose(0, 1)).view(channels, state)


def _scan_(x: torch.Tensor, rate: torch.Tensor, A: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Solve h_t = exp(rate_t A) h_{t-1} + x_t in place of ``x``, with a zero initial state.

    With ``reverse`` the recurrence runs from the last step to the first:
    h_t = exp(rate_t A) h_{t+1} + x_t. No autograd.

    The sequence is cut into chunks of K steps. (1) All chunks advance
    together, each from a zero state (K vectorised steps). (2) The state
    entering each chunk follows the same recurrence over chunks, so it is
    solved by a recursive call of length L / K. (3) The entering state,
    decayed to each step, is added in one multiply-add. The decay from a
    chunk's start to step s is exp(A * sum of rate), the product of the
    per-step decays, all <= 1 for rate >= 0 and A <= 0, so nothing is ever
    divided by a decay.

    Args:
        x: (L, B, D, N) contiguous drive, overwritten by the states.
        rate: (L, B, D), normally the step sizes delta >= 0.
        A: (D, N).
        reverse: Run from t = L - 1 down to 0.

    Returns:
        The per-step decays exp(rate A), (L, B, D, N).
    """
    decay = torch.mul(rate.unsqueeze(-1), A).exp_()  # (L, B, D, N)
    _scan_with_decay_(x, decay, rate, A, reverse)
    return decay


def _scan_with_decay_(x, decay, rate, A, reverse) -> None:
    length = x.shape[0]
    chunk = min(_CHUNK, length)
    if length == 0:
        return
    num_chunks = math.ceil(length / chunk)
    padding = num_chunks * chunk - length

    # Padding steps have decay 1 and drive 0 and sit at the end, so they never reach a real step.
    local = F.pad(x, (0, 0, 0, 0, 0, 0, 0, padding)) if padding else x
    local_decay = F.pad(decay, (0, 0, 0, 0, 0, 0, 0, padding), value=1.0) if padding else decay
    local = local.view(num_chunks, chunk, *x.shape[1:])  # (chunks, K, B, D, N)
    local_decay = local_decay.view(num_chunks, chunk, *x.shape[1:])

    # 1. Scan inside every chunk at once, each chunk starting from a zero state.
    steps = range(chunk - 2, -1, -1) if reverse else range(1, chunk)
    for step in steps:
        previous = step + 1 if reverse else step - 1
        local[:, step].addcmul_(local_decay[:, step], local[:, previous])
    if num_chunks > 1:
        _carry_between_chunks_(local, rate, A, padding, reverse)
    if padding:
        x.copy_(local.view(-1, *x.shape[1:])[:length])


def _carry_between_chunks_(local, rate, A, padding, reverse) -> None:
    """Steps 2 and 3 of ``_scan_``: add each chunk's entering state, decayed to every step."""
    num_chunks, chunk = local.shape[:2]
    rate = F.pad(rate, (0, 0, 0, 0, 0, padding)) if padding else rate
    rate = rate.reshape(num_chunks, chunk, *rate.shape[1:]).double()  # (chunks, K, B, D)

    # Accumulated rate from the chunk's entry step (its last when reversed) to each step, inclusive.
    accumulated = rate.flip(1).cumsum(1).flip(1) if reverse else rate.cumsum(1)
    edge = 0 if reverse else chunk - 1  # the step that hands the state to the next chunk
    chunk_rate = accumulated[:, edge].to(A.dtype)  # (chunks, B, D)

    # 2. Entering state of chunk c: s_c = exp(A * chunk_rate_{c-1}) s_{c-1} + local_{c-1, edge}, s_0 = 0
    #    (indices mirrored when reversed), a scan of length L / K.
    entering = torch.zeros_like(local[:, 0])  # (chunks, B, D, N)
    entering_rate = torch.zeros_like(chunk_rate)
    if reverse:
        entering[:-1] = local[1:, edge]
        entering_rate[:-1] = chunk_rate[1:]
    else:
        entering[1:] = local[:-1, edge]
        entering_rate[1:] = chunk_rate[:-1]
    _scan_(entering, entering_rate, A, reverse)

    # 3. Add the entering state decayed to each step.
    decay_to_step = torch.mul(accumulated.to(A.dtype).unsqueeze(-1), A).exp_()  # (chunks, K, B, D, N)
    local.addcmul_(decay_to_step, entering.unsqueeze(1))


# Steps per chunk of ``_scan_``. Each level costs K - 1 vectorised steps plus a
# few whole-tensor operations, and the recursion has about log_K(L) levels.
_CHUNK = 16


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
