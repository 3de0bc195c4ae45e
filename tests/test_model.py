"""Tests of the HUR-MACL model: level outputs, ablations, losses, inference rules and configuration."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hurmacl_kit.models import ABLATIONS, HURMACL, INFERENCE_RULES, HURMACLConfig
from hurmacl_kit.models.losses import downsample_labels, segmentation_loss
from hurmacl_kit.uncertainty import normalized_entropy

SMALL = dict(
    in_channels=3, num_classes=4, features=(4, 8, 8, 16, 16),
    vim_d_model=8, vim_depth=1, vim_d_state=4, dcnn_hidden=4, dcnn_layers=1,
)


def small_model(ablation="hurmacl", **overrides) -> HURMACL:
    torch.manual_seed(0)
    return HURMACL(HURMACLConfig.from_ablation(ablation, **{**SMALL, **overrides}))


def batch(height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 3, height, width, generator=generator)
    target = torch.randint(0, 4, (2, height, width), generator=generator)
    return image, target


def test_forward_four_levels():
    model = small_model()
    image, _ = batch(128, 128)

    outputs = model(image)

    assert len(outputs) == 4
    for level, output in enumerate(outputs):
        size = 128 >> level
        assert output.unet_logits.shape == (2, 4, size, size)
        assert output.uncertainty.shape == (2, size, size)
        assert output.hard_mask.shape == (2, size, size)
        assert output.vim_logits.shape == (2, 4, size, size)
        assert output.dcnn_logits.shape == (2, 4, size, size)


def test_forward_odd_size():
    model = small_model()
    image, target = batch(127, 129)

    outputs = model(image)
    losses = model.compute_loss(outputs, target)

    sizes = [tuple(output.unet_logits.shape[-2:]) for output in outputs]
    assert sizes == [(127, 129), (63, 64), (31, 32), (15, 16)]
    assert all(output.vim_logits.shape == output.unet_logits.shape for output in outputs)
    assert all(output.dcnn_logits.shape == output.unet_logits.shape for output in outputs)
    assert torch.isfinite(losses.total)


def test_forward_levels_subset():
    model = small_model(hurm_levels=(0, 2))
    image, _ = batch(32, 32)

    outputs = model(image)

    assert [output.vim_logits is not None for output in outputs] == [True, False, True, False]
    assert [output.hard_mask is not None for output in outputs] == [True, False, True, False]


@pytest.mark.parametrize("ablation", list(ABLATIONS))
def test_ablation_trains(ablation):
    model = small_model(ablation)
    image, target = batch(32, 32)

    losses = model.compute_loss(model(image), target)
    losses.total.backward()

    flags = ABLATIONS[ablation]
    assert torch.isfinite(losses.total)
    assert all(parameter.grad is not None for parameter in model.unet.parameters())
    if not (flags["use_vim"] or flags["use_dcnn"]):
        assert losses.loss2.item() == 0.0
        assert losses.hard_fraction == 0.0
    else:
        assert losses.loss2.item() > 0.0
        assert losses.hard_fraction > 0.0
    if not flags["use_distillation"]:
        assert losses.loss3.item() == 0.0
        assert losses.distillation == {}
    else:
        assert losses.loss3.item() > 0.0
        assert sorted(losses.distillation) == [0, 1, 2, 3]
    assert (len(model.vim) > 0) == flags["use_vim"]
    assert (len(model.dcnn) > 0) == flags["use_dcnn"]


def test_total_combines_weighted_parts():
    model = small_model(alpha=0.3, beta=2.0)
    image, target = batch(32, 32)

    losses = model.compute_loss(model(image), target)

    expected = losses.loss1 + 0.3 * losses.loss2 + 2.0 * losses.loss3
    torch.testing.assert_close(losses.total, expected)


def test_loss1_deep_supervision_weights():
    model = small_model("unet")
    image, target = batch(32, 32)

    outputs = model(image)
    losses = model.compute_loss(outputs, target)

    # Level weights 2^-l normalised: (8, 4, 2, 1) / 15.
    expected = sum(
        weight / 15 * segmentation_loss(output.unet_logits, downsample_labels(target, output.unet_logits.shape[-2:]))
        for weight, output in zip((8, 4, 2, 1), outputs)
    )
    torch.testing.assert_close(losses.loss1, expected)


def test_hard_mask_follows_threshold():
    model = small_model(threshold=0.5)
    image, _ = batch(32, 32)

    output = model(image)[0]

    probabilities = torch.softmax(output.unet_logits, dim=1)
    torch.testing.assert_close(output.uncertainty, normalized_entropy(probabilities))
    assert torch.equal(output.hard_mask, output.uncertainty > 0.5)


def test_no_hard_pixels_trains_and_predicts():
    # T just below 1 leaves no hard pixel at any level: the branches get empty masks.
    model = small_model(threshold=1.0 - 1e-12)
    image, target = batch(32, 32)

    outputs = model(image)
    losses = model.compute_loss(outputs, target)
    losses.total.backward()
    probabilities, _ = model.predict_probabilities(image)

    for output in outputs:
        assert output.hard_mask is None or not output.hard_mask.any()
    assert losses.hard_fraction == 0.0
    assert losses.loss2.item() == 0.0
    assert losses.loss3.item() == 0.0
    torch.testing.assert_close(probabilities, torch.softmax(model.unet(image)[0], dim=1))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(threshold=0.0),
        dict(threshold=1.0),
        dict(threshold=-0.1),
        dict(hurm_levels=(4,)),
        dict(hurm_levels=(-1,)),
        dict(inference_rule="max"),
        dict(num_classes=1),
        dict(use_vim=False, use_distillation=True),
        dict(use_dcnn=False, use_distillation=True),
    ],
    ids=str,
)
def test_invalid_config_raises(overrides):
    with pytest.raises(ValueError):
        HURMACLConfig(**overrides)


def test_unknown_ablation_raises():
    with pytest.raises(ValueError, match="unknown ablation"):
        HURMACLConfig.from_ablation("unet+transformer")


def test_distillation_message_names_branches():
    with pytest.raises(ValueError, match="use_vim=True and use_dcnn=True"):
        HURMACLConfig(use_vim=True, use_dcnn=False, use_distillation=True)


def test_config_round_trip():
    config = HURMACLConfig.from_ablation("unet+vim", threshold=0.01, hurm_levels=(0, 1), features=(8, 16, 32, 64, 128))

    values = config.to_dict()
    through_json = json.loads(json.dumps(values))

    assert HURMACLConfig.from_dict(values) == config
    assert HURMACLConfig.from_dict(through_json) == config


def test_config_unknown_key_raises():
    values = HURMACLConfig().to_dict()
    values["dropout"] = 0.1

    with pytest.raises(ValueError, match="dropout"):
        HURMACLConfig.from_dict(values)


def prepared_model():
    """Return an eval-mode model and an image where about half the level-0 pixels are hard."""
    model = small_model().eval()
    image, _ = batch(32, 32, seed=3)
    with torch.no_grad():
        uncertainty = normalized_entropy(torch.softmax(model.unet(image)[0], dim=1))
    model.config.threshold = float(uncertainty.median())
    return model, image


def test_predict_unet_rule_is_softmax():
    model, image = prepared_model()
    model.config.inference_rule = "unet"

    probabilities, uncertainty = model.predict_probabilities(image)

    with torch.no_grad():
        expected = torch.softmax(model.unet(image)[0], dim=1)
    torch.testing.assert_close(probabilities, expected, rtol=0, atol=0)
    torch.testing.assert_close(uncertainty, normalized_entropy(expected))


@pytest.mark.parametrize("rule", INFERENCE_RULES)
def test_predict_rules_match_definition(rule):
    model, image = prepared_model()
    model.config.inference_rule = rule

    probabilities, _ = model.predict_probabilities(image)

    with torch.no_grad():
        output = model(image, levels=(0,))[0]
    unet = torch.softmax(output.unet_logits, dim=1)
    vim = torch.softmax(output.vim_logits, dim=1)
    dcnn = torch.softmax(output.dcnn_logits, dim=1)
    fused = {"unet": unet, "average": (unet + vim + dcnn) / 3, "branches": (vim + dcnn) / 2}[rule]
    hard = output.hard_mask.unsqueeze(1).expand_as(unet)
    assert 0.2 < output.hard_mask.float().mean().item() < 0.8
    torch.testing.assert_close(probabilities[~hard], unet[~hard], rtol=0, atol=0)
    torch.testing.assert_close(probabilities[hard], fused[hard], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(2, 32, 32), rtol=0, atol=1e-6)


def test_predict_single_branch_average():
    torch.manual_seed(0)
    model = small_model("unet+dcnn", inference_rule="branches").eval()
    image, _ = batch(32, 32)

    probabilities, _ = model.predict_probabilities(image)

    with torch.no_grad():
        output = model(image, levels=(0,))[0]
    hard = output.hard_mask.unsqueeze(1).expand_as(probabilities)
    dcnn = torch.softmax(output.dcnn_logits, dim=1)
    torch.testing.assert_close(probabilities[hard], dcnn[hard])


def test_predict_without_branches_at_level0():
    model = small_model(hurm_levels=(1, 2)).eval()
    image, _ = batch(32, 32)

    probabilities, _ = model.predict_probabilities(image)

    with torch.no_grad():
        expected = torch.softmax(model.unet(image)[0], dim=1)
    torch.testing.assert_close(probabilities, expected, rtol=0, atol=0)


def test_class_weights_hand_counts():
    from hurmacl_kit.models.losses import class_weights

    target = torch.zeros(1, 10, 10, dtype=torch.long)
    target[0, :1] = 1  # 10 pixels of class 1, 90 of background

    weights = class_weights(target, num_classes=3)

    assert weights[0].item() == pytest.approx(1.0)
    assert weights[1].item() == pytest.approx(math.sqrt(91 / 11))
    assert weights[2].item() == pytest.approx(math.sqrt(91 / 1))


def test_masked_loss_ignores_outside_pixels():
    from hurmacl_kit.models.losses import masked_segmentation_loss

    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 4)
    target = torch.randint(0, 3, (1, 4, 4))
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2] = True
    changed = logits.clone()
    changed[..., 2:, :] = torch.randn(1, 3, 2, 4) * 10

    assert masked_segmentation_loss(logits, target, mask).item() == pytest.approx(
        masked_segmentation_loss(changed, target, mask).item()
    )


def test_masked_loss_matches_map_formula():
    from hurmacl_kit.models.losses import class_weights, masked_segmentation_loss

    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 5, 6, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 5, 6), generator=generator)
    mask = torch.rand(2, 5, 6, generator=generator) < 0.4

    # The definition on whole maps: weighted CE over M, soft Dice of M * p against M * one_hot.
    weight = class_weights(target, 3, mask).double()
    pixel_ce = torch.nn.functional.cross_entropy(logits, target, weight=weight, reduction="none")
    cross_entropy = (pixel_ce * mask).sum() / (weight[target] * mask).sum()
    keep = mask[:, None].double()
    probabilities = torch.softmax(logits, 1) * keep
    one_hot = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).double() * keep
    intersection = (probabilities * one_hot).sum((0, 2, 3))
    totals = (probabilities + one_hot).sum((0, 2, 3))
    dice = (2 * intersection + 1e-5) / (totals + 1e-5)
    present = one_hot.sum((0, 2, 3))[1:] > 0
    expected = cross_entropy + 1 - dice[1:][present].mean()

    assert masked_segmentation_loss(logits, target, mask).item() == pytest.approx(expected.item(), rel=1e-12)
