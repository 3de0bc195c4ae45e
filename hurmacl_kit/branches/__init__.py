"""The two HUR-MACL branches and their kernels.

- ``selective_scan``: drop-in for mamba-ssm's ``selective_scan_fn``.
- ``deform_conv2d``: drop-in for ``torchvision.ops.deform_conv2d``.
- ``ViMBranch``: Vision Mamba encoder over the masked probability map.
- ``DCNNBranch``: deformable CNN over the masked probability map.
"""

from hurmacl_kit.branches.dcnn import DCNNBranch, DCNNConfig, DeformConv2d
from hurmacl_kit.branches.deform import bilinear_sample, deform_conv2d, torchvision_available
from hurmacl_kit.branches.scan import linear_scan, mamba_ssm_available, selective_scan, selective_scan_reference
from hurmacl_kit.branches.vim import BidirectionalMambaBlock, ViMBranch, ViMConfig

__all__ = [
    "BidirectionalMambaBlock",
    "DCNNBranch",
    "DCNNConfig",
    "DeformConv2d",
    "ViMBranch",
    "ViMConfig",
    "bilinear_sample",
    "deform_conv2d",
    "linear_scan",
    "mamba_ssm_available",
    "selective_scan",
    "selective_scan_reference",
    "torchvision_available",
]
