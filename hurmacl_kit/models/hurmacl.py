"""HUR-MACL: a U-Net whose hard regions are refined by a ViM and a DCNN branch.

At every decoder level l listed in ``hurm_levels`` (0 is full resolution):

    p_l = softmax(head_l(decoder_l))          U-Net class probabilities
    M_l = normalized_entropy(p_l) > T         hard region
    x_l = M_l * p_l                           input of both branches
    loss2_l = seg(M_l * vim_l(x_l), M_l * y_l) + seg(M_l * dcnn_l(x_l), M_l * y_l)
    loss3_l = heterogeneous_distillation(vim_l, dcnn_l, y_l, M_l)

and loss = loss1 + alpha * loss2 + beta * loss3, where loss1 is the U-Net
loss with deep supervision and each level is weighted by 2^-l (normalised).
The ablation switches ``use_vim``, ``use_dcnn`` and ``use_distillation``
give the rows of the HUR-MACL ablation table (see ``ABLATIONS``).

Inference rule (``inference_rule``, applied at level 0 inside M_0):
    "unet":     the U-Net probabilities everywhere;
    "average":  the mean of the U-Net and the enabled branches' probabilities;
    "branches": the mean of the enabled branches' probabilities.
Outside M_0 the U-Net probabilities are always used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from hurmacl_kit import uncertainty as unc
from hurmacl_kit.branches import DCNNBranch, DCNNConfig, ViMBranch, ViMConfig
from hurmacl_kit.distill import heterogeneous_distillation
from hurmacl_kit.models.losses import downsample_labels, masked_segmentation_loss, segmentation_loss
from hurmacl_kit.models.unet import UNet2D

INFERENCE_RULES = ("unet", "average", "branches")

ABLATIONS = {
    "unet": dict(use_vim=False, use_dcnn=False, use_distillation=False),
    "unet+vim": dict(use_vim=True, use_dcnn=False, use_distillation=False),
    "unet+dcnn": dict(use_vim=False, use_dcnn=True, use_distillation=False),
    "unet+vim+dcnn": dict(use_vim=True, use_dcnn=True, use_distillation=False),
    "hurmacl": dict(use_vim=True, use_dcnn=True, use_distillation=True),
}


@dataclass
class HURMACLConfig:
    """Architecture and loss weights of HUR-MACL.

    Attributes:
        in_channels: Input channels (2 * context + 1 CT slices).
        num_classes: Classes including background.
        features: U-Net encoder channels, finest first (5 stages, 4 levels).
        threshold: Uncertainty threshold T of the hard-region mask.
        hurm_levels: Decoder levels with branches, 0 = full resolution.
        use_vim: Enable the ViM branch.
        use_dcnn: Enable the DCNN branch.
        use_distillation: Enable loss3 (needs both branches).
        alpha: Weight of loss2.
        beta: Weight of loss3.
        vim_patch_size: ViM patch size at level 0; level l uses max(1, P >> l).
        vim_d_model: ViM token width.
        vim_depth: ViM blocks.
        vim_d_state: ViM state size N.
        dcnn_hidden: DCNN hidden channels.
        dcnn_layers: DCNN deformable layers.
        inference_rule: One of ``INFERENCE_RULES``.
    """

    in_channels: int = 3
    num_classes: int = 8
    features: tuple[int, ...] = (16, 32, 64, 128, 256)
    threshold: float = unc.DEFAULT_THRESHOLD
    hurm_levels: tuple[int, ...] = (0, 1, 2, 3)
    use_vim: bool = True
    use_dcnn: bool = True
    use_distillation: bool = True
    # NOTE: alpha and beta are not given in the sources we had; 1.0 is a neutral default.
    alpha: float = 1.0
    beta: float = 1.0
    vim_patch_size: int = 4
    vim_d_model: int = 32
    vim_depth: int = 2
    vim_d_state: int = 16
    dcnn_hidden: int = 16
    dcnn_layers: int = 2
    inference_rule: str = "average"

    def __post_init__(self):
        self.features = tuple(self.features)
        self.threshold = float(self.threshold)
        self.hurm_levels = tuple(self.hurm_levels)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on an inconsistent configuration."""
        unc.validate_threshold(self.threshold)
        levels = len(self.features) - 1
        bad_levels = [level for level in self.hurm_levels if not 0 <= level < levels]
        if bad_levels:
            raise ValueError(f"hurm_levels {bad_levels} out of range: the U-Net has decoder levels 0..{levels - 1}")
        if self.use_distillation and not (self.use_vim and self.use_dcnn):
            raise ValueError("use_distillation=True needs use_vim=True and use_dcnn=True (loss3 compares the two)")
        if self.inference_rule not in INFERENCE_RULES:
            raise ValueError(f"unknown inference_rule {self.inference_rule!r}; choose one of {INFERENCE_RULES}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (background plus organs), got {self.num_classes}")

    @property
    def has_branches(self) -> bool:
        return self.use_vim or self.use_dcnn

    @classmethod
    def from_ablation(cls, name: str, **overrides) -> "HURMACLConfig":
        """Build the configuration of one ablation row: a key of ``ABLATIONS``."""
        if name not in ABLATIONS:
            raise ValueError(f"unknown ablation {name!r}; choose one of {tuple(ABLATIONS)}")
        return cls(**{**ABLATIONS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "HURMACLConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown HURMACLConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)


@dataclass
class LevelOutput:
    """Everything computed at one decoder level (tensors are (B, ...))."""

    unet_logits: torch.Tensor
    uncertainty: torch.Tensor | None = None
    hard_mask: torch.Tensor | None = None
    vim_logits: torch.Tensor | None = None
    dcnn_logits: torch.Tensor | None = None


@dataclass
class LossOutput:
    """Total loss and its parts (scalars), plus per-level distillation results."""

    total: torch.Tensor
    loss1: torch.Tensor
    loss2: torch.Tensor
    loss3: torch.Tensor
    hard_fraction: float
    distillation: dict = field(default_factory=dict)


class HURMACL(nn.Module):
    """U-Net backbone plus hard-region ViM and DCNN branches."""

    def __init__(self, config: HURMACLConfig):
        super().__init__()
        self.config = config
        self.unet = UNet2D(config.in_channels, config.num_classes, config.features)

        classes = config.num_classes
        self.vim = nn.ModuleDict()
        self.dcnn = nn.ModuleDict()
        for level in config.hurm_levels:
            if config.use_vim:
                patch = max(1, config.vim_patch_size >> level)
                vim_config = ViMConfig(
                    classes, classes, patch_size=patch, d_model=config.vim_d_model,
                    depth=config.vim_depth, d_state=config.vim_d_state,
                )
                self.vim[str(level)] = ViMBranch(vim_config)
            if config.use_dcnn:
                dcnn_config = DCNNConfig(classes, classes, config.dcnn_hidden, config.dcnn_layers)
                self.dcnn[str(level)] = DCNNBranch(dcnn_config)

    def forward(self, image: torch.Tensor, levels: tuple[int, ...] | None = None) -> list[LevelOutput]:
        """Run the U-Net and, at the HURM levels, the branches on the hard regions.

        Args:
            image: (B, C_in, H, W).
            levels: HURM levels to run the branches on; all configured ones if None.

        Returns:
            One ``LevelOutput`` per decoder level, finest first.
        """
        # image: (B, C_in, H, W)
        unet_logits = self.unet(image)
        levels = self.config.hurm_levels if levels is None else levels

        outputs = []
        for level, logits in enumerate(unet_logits):
            output = LevelOutput(unet_logits=logits)
            if self.config.has_branches and level in levels:
                self._run_branches(level, output)
            outputs.append(output)
        return outputs

    def _run_branches(self, level: int, output: LevelOutput) -> None:
        probabilities = torch.softmax(output.unet_logits, dim=1)  # (B, C, H, W)
        output.uncertainty = unc.normalized_entropy(probabilities.detach())  # (B, H, W)
        output.hard_mask = unc.hard_region_mask(output.uncertainty, self.config.threshold)
        masked = unc.masked_probabilities(probabilities, output.hard_mask)

        key = str(level)
        if key in self.vim:
            output.vim_logits = self.vim[key](masked, output.hard_mask)
        if key in self.dcnn:
            output.dcnn_logits = self.dcnn[key](masked, output.hard_mask)

    def compute_loss(self, outputs: list[LevelOutput], target: torch.Tensor) -> LossOutput:
        """Compute loss1 + alpha * loss2 + beta * loss3.

        Args:
            outputs: Result of ``forward``.
            target: (B, H, W) integer labels at full resolution.
        """
        weights = _level_weights(len(outputs))
        zero = outputs[0].unet_logits.sum() * 0.0
        loss1, loss2, loss3 = zero, zero, zero
        hard_pixels, total_pixels = 0, 0
        distillation = {}

        for level, output in enumerate(outputs):
            level_target = downsample_labels(target, output.unet_logits.shape[-2:])
            loss1 = loss1 + weights[level] * segmentation_loss(output.unet_logits, level_target)
            if output.hard_mask is None:
                continue

            hard_pixels += int(output.hard_mask.sum())
            total_pixels += output.hard_mask.numel()
            for branch_logits in (output.vim_logits, output.dcnn_logits):
                if branch_logits is not None:
                    loss2 = loss2 + weights[level] * masked_segmentation_loss(branch_logits, level_target, output.hard_mask)
            if self.config.use_distillation:
                result = heterogeneous_distillation(
                    output.vim_logits, output.dcnn_logits, level_target, output.hard_mask
                )
                distillation[level] = result
                loss3 = loss3 + weights[level] * result.loss

        total = loss1 + self.config.alpha * loss2 + self.config.beta * loss3
        fraction = hard_pixels / total_pixels if total_pixels else 0.0
        return LossOutput(total, loss1, loss2, loss3, fraction, distillation)

    @torch.no_grad()
    def predict_probabilities(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return fused class probabilities (B, C, H, W) and the U-Net uncertainty (B, H, W).

        Branches run at level 0 only, and their output replaces or joins the
        U-Net's inside the hard region M_0 according to ``inference_rule``.
        """
        # image: (B, C_in, H, W)
        rule = self.config.inference_rule
        use_branches = rule != "unet" and self.config.has_branches and 0 in self.config.hurm_levels
        output = self.forward(image, levels=(0,) if use_branches else ())[0]

        probabilities = torch.softmax(output.unet_logits, dim=1)
        if output.uncertainty is None:
            output.uncertainty = unc.normalized_entropy(probabilities)
        if not use_branches:
            return probabilities, output.uncertainty

        branch_probabilities = [
            torch.softmax(logits, dim=1) for logits in (output.vim_logits, output.dcnn_logits) if logits is not None
        ]
        members = branch_probabilities if rule == "branches" else [probabilities] + branch_probabilities
        fused = torch.stack(members).mean(0)
        hard = output.hard_mask.unsqueeze(1)
        return torch.where(hard, fused, probabilities), output.uncertainty


def _level_weights(levels: int) -> list[float]:
    raw = [0.5**level for level in range(levels)]
    return [weight / sum(raw) for weight in raw]
