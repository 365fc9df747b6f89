"""Model kinds (dual encoder, fusion encoder): presets, construction, checkpoints and FLOP counts."""

from mmscale.models.checkpoint import CheckpointError, build_model, load_model, save_model
from mmscale.models.config import PRESETS, ModelConfig, ModelSizes
from mmscale.models.dual_encoder import DualEncoder, DualEncoderOutput, MaskedLMHead
from mmscale.models.flops import training_flops_per_sample
from mmscale.models.fusion import FusionEncoder

__all__ = ["PRESETS", "CheckpointError", "DualEncoder", "DualEncoderOutput", "FusionEncoder", "MaskedLMHead", "ModelConfig",
           "ModelSizes", "build_model", "load_model", "save_model", "training_flops_per_sample"]
