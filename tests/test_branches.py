"""Tests of the ViM and DCNN branches: shapes, token skipping, scan direction and causality, zero-offset start."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from hurmacl_kit.branches import (
    BidirectionalMambaBlock,
    DCNNBranch,
    DCNNConfig,
    DeformConv2d,
    ViMBranch,
    ViMConfig,
    selective_scan_reference,
)

CLASSES = 3


def small_vim(**overrides) -> ViMBranch:
    torch.manual_seed(0)
    values = dict(patch_size=4, d_model=16, depth=2, d_state=4, position_grid=8)
    values.update(overrides)
    return ViMBranch(ViMConfig(CLASSES, CLASSES, **values))


def small_dcnn(**overrides) -> DCNNBranch:
    torch.manual_seed(0)
    return DCNNBranch(DCNNConfig(CLASSES, CLASSES, hidden_channels=8, num_layers=2, **overrides))


def probabilities(batch, height, width, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(batch, CLASSES, height, width, generator=generator), dim=1)


@pytest.mark.parametrize("size", [(127, 129), (30, 34), (5, 3), (1, 1), (16, 16)])
def test_vim_output_shape(size):
    branch = small_vim()
    x = probabilities(2, *size)

    logits = branch(x, torch.ones(2, *size, dtype=torch.bool))

    assert logits.shape == (2, CLASSES, *size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("size", [(127, 129), (30, 34), (5, 3), (1, 1)])
def test_dcnn_output_shape(size):
    branch = small_dcnn()
    x = probabilities(2, *size)

    logits = branch(x)

    assert logits.shape == (2, CLASSES, *size)
    assert torch.isfinite(logits).all()


def test_vim_all_hard_skip_equivalent():
    x = probabilities(2, 18, 22)
    mask = torch.ones(2, 18, 22, dtype=torch.bool)

    skipping = small_vim(skip_easy_tokens=True)(x, mask)
    dense = small_vim(skip_easy_tokens=False)(x, mask)

    torch.testing.assert_close(skipping, dense, rtol=0, atol=0)


def gathered_reference(branch: ViMBranch, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Run embed, position, blocks and head on the kept patches of one sample, giving (L_kept, P*P*C)."""
    patch = branch.config.patch_size
    tokens = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch)
    position = rearrange(branch.position, "1 d h w -> 1 (h w) d")
    sequence = (branch.embed(tokens) + position)[:, kept]  # (1, L_kept, D)
    for block in branch.blocks:
        sequence = block(sequence)
    return branch.head(branch.norm(sequence))[0]


def test_vim_kept_patches_match_gathered_sequence():
    # 32 x 32 with patch 4 is an 8 x 8 grid, the size of the position grid, so no resizing happens.
    branch = small_vim()
    x = probabilities(2, 32, 32)
    mask = torch.zeros(2, 32, 32, dtype=torch.bool)
    mask[0, 1, 1] = True  # patch 0 of sample 0
    mask[0, 13:18, 21] = True  # patches (3, 5) and (4, 5)
    mask[1, 30, 2:9] = True  # patches (7, 0), (7, 1), (7, 2) of sample 1
    hard_patches = [[0, 29, 37], [56, 57, 58]]

    logits = branch(x, mask)
    patches = rearrange(logits, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=4, p2=4)

    for sample, kept in enumerate(hard_patches):
        expected = gathered_reference(branch, x[sample : sample + 1], torch.tensor(kept))
        torch.testing.assert_close(patches[sample, kept], expected, rtol=1e-5, atol=1e-6)


def test_vim_easy_patches_do_not_leak():
    branch = small_vim()
    x = probabilities(1, 32, 32)
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, :8, :8] = True
    changed = x.clone()
    changed[..., 16:, 16:] = torch.rand(1, CLASSES, 16, 16)

    before = branch(x, mask)
    after = branch(changed, mask)

    torch.testing.assert_close(before[..., :8, :8], after[..., :8, :8], rtol=0, atol=0)


def test_vim_empty_mask_constant_output():
    branch = small_vim()
    x = probabilities(1, 16, 16)

    logits = branch(x, torch.zeros(1, 16, 16, dtype=torch.bool))

    # Every token is dropped, so each patch decodes the zero token: the same P x P pattern everywhere.
    patches = rearrange(logits, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=4, p2=4)
    torch.testing.assert_close(patches, patches[:, :1].expand_as(patches), rtol=0, atol=0)


def test_vim_gradients_reach_input():
    branch = small_vim()
    x = probabilities(1, 20, 20).requires_grad_(True)
    mask = torch.zeros(1, 20, 20, dtype=torch.bool)
    mask[0, 5:10, 5:10] = True

    branch(x, mask).square().sum().backward()

    assert x.grad[..., 5:10, 5:10].abs().sum() > 0
    assert all(parameter.grad is not None for parameter in branch.parameters())


def direction_reference(direction, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Compute one scan direction with selective_scan_reference. x and z are (B, E, L) float64."""
    length = x.shape[-1]
    x = F.silu(direction.conv(x)[..., :length])
    projected = direction.x_proj(x.transpose(1, 2))
    dt, B, C = projected.split([direction.dt_rank, direction.d_state, direction.d_state], dim=-1)
    delta = (direction.dt_proj.weight @ dt.transpose(1, 2)).detach()
    return selective_scan_reference(
        x, delta, -torch.exp(direction.A_log), B.transpose(1, 2), C.transpose(1, 2), direction.D, z,
        direction.dt_proj.bias, delta_softplus=True,
    )


def small_block() -> BidirectionalMambaBlock:
    torch.manual_seed(1)
    return BidirectionalMambaBlock(ViMConfig(CLASSES, CLASSES, d_model=8, d_state=4, expand=2, d_conv=3)).double()


def test_block_matches_reference_directions():
    block = small_block()
    tokens = torch.randn(2, 11, 8, dtype=torch.float64)

    output = block(tokens)

    x, z = block.in_proj(block.norm(tokens)).transpose(1, 2).chunk(2, dim=1)
    forward = direction_reference(block.forward_scan, x, z)
    backward = direction_reference(block.backward_scan, x.flip(-1), z.flip(-1)).flip(-1)
    expected = tokens + block.out_proj((forward + backward).transpose(1, 2))
    torch.testing.assert_close(output, expected, rtol=1e-9, atol=1e-9)


def test_block_flip_swaps_directions():
    # Swapping the two directions' parameters and flipping the sequence gives the flipped output.
    block = small_block()
    swapped = small_block()
    swapped.forward_scan.load_state_dict(block.backward_scan.state_dict())
    swapped.backward_scan.load_state_dict(block.forward_scan.state_dict())
    tokens = torch.randn(1, 9, 8, dtype=torch.float64)

    torch.testing.assert_close(swapped(tokens.flip(1)).flip(1), block(tokens), rtol=1e-10, atol=1e-10)


class ZeroDirection(nn.Module):
    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def token_jacobian(block, length=6) -> torch.Tensor:
    """Return the (L, L) map of |d output_t / d input_s| summed over channels."""
    tokens = torch.randn(1, length, 8, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(block, tokens)  # (1, L, D, 1, L, D)
    return jacobian[0, :, :, 0].abs().sum(dim=(1, 3))


def test_forward_scan_causal():
    block = small_block()
    block.backward_scan = ZeroDirection()

    dependence = token_jacobian(block)

    later = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)  # s > t
    assert (dependence[later] == 0).all()
    assert (dependence[~later] > 0).all()


def test_backward_scan_anticausal():
    block = small_block()
    block.forward_scan = ZeroDirection()

    dependence = token_jacobian(block)

    earlier = torch.tril(torch.ones(6, 6, dtype=torch.bool), diagonal=-1)  # s < t
    assert (dependence[earlier] == 0).all()
    assert (dependence[~earlier] > 0).all()


def test_bidirectional_sees_both_sides():
    dependence = token_jacobian(small_block())

    assert (dependence > 0).all()


@pytest.mark.parametrize("modulated", [True, False])
def test_deform_layer_starts_as_conv(modulated):
    torch.manual_seed(2)
    layer = DeformConv2d(4, 5, modulated=modulated)
    x = torch.randn(2, 4, 9, 7)

    offset, mask = layer.offsets_and_mask(x)

    assert offset.shape == (2, 18, 9, 7)
    assert (offset == 0).all()
    if modulated:
        assert mask.shape == (2, 9, 9, 7)
        assert (mask == 1).all()
    else:
        assert mask is None
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1), rtol=1e-5, atol=1e-5)


def test_deform_offset_groups_shape():
    layer = DeformConv2d(4, 4, modulated=True, offset_groups=2)

    offset, mask = layer.offsets_and_mask(torch.randn(1, 4, 5, 5))

    assert offset.shape == (1, 36, 5, 5)
    assert mask.shape == (1, 18, 5, 5)
    assert layer(torch.randn(1, 4, 5, 5)).shape == (1, 4, 5, 5)


def test_dcnn_zero_offsets_at_init():
    branch = small_dcnn()

    offsets = branch.sampling_offsets(probabilities(1, 12, 12))

    assert len(offsets) == 2
    assert all((offset == 0).all() for offset in offsets)


def test_dcnn_offset_predictor_gets_gradient():
    branch = small_dcnn()
    x = probabilities(1, 12, 12)

    branch(x).square().sum().backward()

    for layer in branch.layers:
        assert layer[0].offset_predictor.weight.grad.abs().sum() > 0


def dcnn_with_offsets(**overrides) -> DCNNBranch:
    """A double-precision DCNN whose offset predictors give non-zero offsets."""
    branch = small_dcnn(**overrides).double()
    with torch.no_grad():
        for layer in branch.layers:
            layer[0].offset_predictor.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    return branch


def scattered_mask() -> torch.Tensor:
    mask = torch.zeros(2, 11, 13, dtype=torch.bool)
    mask[0, 2:5, 3:7] = True  # a block
    mask[0, 0, 12] = True  # a corner pixel
    mask[1, 8, 12] = True  # a lone pixel on the border
    return mask


def test_dcnn_without_mask_equals_all_hard():
    branch = dcnn_with_offsets(sparse_below=0.0)
    x = probabilities(1, 12, 12).double()

    all_hard = branch(x, torch.ones(1, 12, 12, dtype=torch.bool))

    torch.testing.assert_close(all_hard, branch(x), rtol=0, atol=0)


def test_dcnn_easy_logits_are_bias():
    branch = dcnn_with_offsets(sparse_below=0.0)
    mask = scattered_mask()

    logits = branch(probabilities(2, 11, 13).double(), mask)

    easy = logits.permute(0, 2, 3, 1)[~mask]  # (easy pixels, C)
    torch.testing.assert_close(easy, branch.head.bias.expand_as(easy), rtol=0, atol=0)


def test_dcnn_reads_hard_neighbourhood_only():
    branch = dcnn_with_offsets(sparse_below=0.0)
    mask = scattered_mask()
    x = probabilities(2, 11, 13).double()
    near = F.max_pool2d(mask.double().unsqueeze(1), 3, stride=1, padding=1).squeeze(1).bool()  # 3x3 dilation

    changed = x.clone()
    changed.permute(0, 2, 3, 1)[~near] = 0.5  # alter the input away from the hard region

    torch.testing.assert_close(branch(changed, mask), branch(x, mask), rtol=0, atol=0)


def test_dcnn_sparse_equals_dense():
    dense = dcnn_with_offsets(sparse_below=0.0)
    sparse = dcnn_with_offsets(sparse_below=1.0)
    mask = scattered_mask()
    x_dense = probabilities(2, 11, 13).double().requires_grad_()
    x_sparse = x_dense.detach().clone().requires_grad_()
    assert sparse._use_sparse(mask)
    assert not dense._use_sparse(mask)

    dense_out, sparse_out = dense(x_dense, mask), sparse(x_sparse, mask)
    probe = torch.randn(dense_out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (dense_out * probe).sum().backward()
    (sparse_out * probe).sum().backward()

    torch.testing.assert_close(sparse_out, dense_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x_sparse.grad, x_dense.grad, rtol=1e-10, atol=1e-10)
    for (name, dense_parameter), sparse_parameter in zip(dense.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(sparse_parameter.grad, dense_parameter.grad, rtol=1e-9, atol=1e-10, msg=name)


def test_dcnn_offsets_zero_outside_mask():
    branch = dcnn_with_offsets()
    mask = scattered_mask()

    offsets = branch.sampling_offsets(probabilities(2, 11, 13).double(), mask)

    for offset in offsets:
        assert (offset.permute(0, 2, 3, 1)[~mask] == 0).all()
        assert offset.abs().sum() > 0


def test_dcnn_sparse_empty_mask():
    branch = small_dcnn().double()
    x = probabilities(2, 6, 5).double().requires_grad_()
    empty = torch.zeros(2, 6, 5, dtype=torch.bool)
    assert branch._use_sparse(empty)

    logits = branch(x, empty)
    logits.sum().backward()

    torch.testing.assert_close(logits, branch.head.bias.view(1, -1, 1, 1).expand_as(logits), rtol=0, atol=0)
    assert (x.grad == 0).all()


def test_dcnn_paths_agree_at_initialisation():
    # Fresh offset predictors give zero offsets, so every tap samples an integer position.
    dense, sparse = small_dcnn(sparse_below=0.0).double(), small_dcnn(sparse_below=1.0).double()
    x = probabilities(2, 11, 13).double()
    mask = scattered_mask()

    for branch in (dense, sparse):
        branch(x, mask).square().sum().backward()

    for (name, dense_parameter), sparse_parameter in zip(dense.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(sparse_parameter.grad, dense_parameter.grad, rtol=1e-9, atol=1e-12, msg=name)
