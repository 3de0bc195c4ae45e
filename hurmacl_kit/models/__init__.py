"""U-Net backbone and the full HUR-MACL model."""

from hurmacl_kit.models.hurmacl import ABLATIONS, HURMACL, INFERENCE_RULES, HURMACLConfig, LevelOutput, LossOutput
from hurmacl_kit.models.unet import UNet2D

__all__ = ["ABLATIONS", "HURMACL", "HURMACLConfig", "INFERENCE_RULES", "LevelOutput", "LossOutput", "UNet2D"]
