"""Dual encoders: presets, construction, checkpoints and FLOP counts."""

from mmscale.models.checkpoint import CheckpointError, build_model, load_model, save_model
from mmscale.models.config import PRESETS, ModelConfig, ModelSizes
from mmscale.models.dual_encoder import DualEncoder, DualEncoderOutput, MaskedLMHead
from mmscale.models.flops import training_flops_per_sample

__all__ = ["PRESETS", "CheckpointError", "DualEncoder", "DualEncoderOutput", "MaskedLMHead", "ModelConfig",
           "ModelSizes", "build_model", "load_model", "save_model", "training_flops_per_sample"]
