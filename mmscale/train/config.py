"""The config tree of a training run: one section per component, wired together by the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from mmscale.data.config import DataConfig
from mmscale.finetune.lora import LoraSettings
from mmscale.finetune.vqa import VqaSettings
from mmscale.losses import DistillConfig, LossConfig
from mmscale.models.config import ModelConfig


@dataclass
class TrainConfig:
    """Budget, batch, optimizer, schedule, precision, checkpoints and logging."""

    # One budget: a key on the command line replaces the YAML's other one; both at one level is an error.
    ALTERNATIVES: ClassVar = (("samples", "steps"),)

    samples: int = 0
    """Total training samples (image-caption pairs); the run stops after samples / global_batch_size steps."""
    steps: int = 0
    """Total optimizer steps, instead of train.samples (set one of the two)."""
    global_batch_size: int = 256
    """Pairs per optimizer step over all ranks = micro batch x accumulation x world size."""
    micro_batch_size: int = 0
    """Pairs per rank per forward pass; 0: global batch / world size (no accumulation)."""
    lr: float = 5e-4
    """Peak learning rate (AdamW)."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to train.lr; then cosine decay to train.min_lr."""
    vision_lr_scale: float = 1.0
    """The image tower's learning rate as a share of train.lr (the same schedule). Below 1 in fine-tuning keeps
    what pretraining taught the tower while a new head and the text side learn at train.lr: VQA on generated
    characters read the glyph at 0.12 with every weight at 5e-4 and at 0.76 with the tower locked."""
    weight_decay: float = 0.2
    """AdamW decoupled weight decay (not applied to norms, biases, embeddings' 1-D params or the temperature)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas (CLIP uses 0.98 for the second moment)."""
    eps: float = 1e-6
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """`adamw`, or `adamw8bit` (bitsandbytes 8-bit optimizer state: a quarter of AdamW's memory; without ZeRO)."""
    gradient_checkpointing: bool = False
    """Recompute tower activations in the backward pass: much less activation memory for about a third more compute."""
    compile: bool = False
    """Compile the model with torch.compile through DeepSpeed's `engine.compile()`, with ZeRO 0-2 (refused with
    ZeRO-3, whose compiler-disabled parameter hooks break the graph at every submodule). Off by default: the
    first steps pay the compilation, and the gain is unmeasured until a GPU run (tools/gpu_check.sh) says
    otherwise."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Mixed precision: bf16, fp16 (dynamic loss scaling), fp32, or `auto`: bf16 on GPUs with native bf16
    (compute capability 8.0 and newer), fp16 on older ones (a V100 or T4 would emulate bf16), fp32 on CPUs
    without native bf16 (AMX or AVX512-BF16), where bf16 is emulated and slower. fp32 on a GPU runs its matmuls
    in TF32."""
    deepspeed: str = "configs/deepspeed/zero3.json"
    """DeepSpeed config (JSON or YAML) passed through; mmscale fills only the batch sizes, precision and
    gradient clipping from this section and says so at start."""
    seed: int = 0
    """Seed for weight init and dropout (the loader has data.seed)."""
    max_bad_steps: int = 5
    """Stop (after saving a checkpoint) when this many steps in a row have a NaN/inf loss; each is skipped."""
    peak_tflops: float = 0.0
    """Peak dense bf16 TFLOP/s of one device for MFU (989 for an H100 SXM); 0: MFU not reported."""
    save_every_steps: int = 1000
    """Save a resumable checkpoint every this many steps (and always at the end)."""
    keep_checkpoints: int = 2
    """Resumable checkpoints kept; older ones are deleted once a newer one is complete."""
    resume: Literal["auto", "never"] = "auto"
    """`auto`: continue from output_dir/checkpoints when a checkpoint is there; `never`: start over, and
    refuse a run dir that already holds checkpoints."""
    log_every_steps: int = 10
    """Write metrics (metrics.jsonl, TensorBoard) every this many steps."""
    tensorboard: bool = True
    """Also write TensorBoard events under output_dir/tensorboard."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    log_sample_keys: bool = False
    """Append each step's sample keys, and the epoch each was read in, to output_dir/sample_keys/rank<r>.jsonl
    (data lineage: which pairs trained which step, for audits and for checking a resumed run)."""

    def __post_init__(self):
        for name in ("keep_checkpoints", "save_every_steps", "log_every_steps", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.vision_lr_scale < 0:
            raise ValueError(f"train.vision_lr_scale must be >= 0, got {self.vision_lr_scale} (to freeze the image "
                             "tower, fine-tune with lora.enabled=true lora.lock_vision=true)")


@dataclass
class EvalConfig:
    """Periodic evaluation on validation shards."""

    every_steps: int = 0
    """Evaluate every this many steps (and at the end); 0: only at the end, when data.val is set."""
    at_start: bool = True
    """With eval.every_steps set, also evaluate before the first step of a new run: the baseline the curves start from."""
    batch_size: int = 64
    """Pairs per rank per evaluation forward pass."""
    classnames: str = ""
    """File with one class name per line (line i is label i of the `.cls` labels) for zero-shot accuracy."""
    templates: str = ""
    """File of prompt templates, one per line with `{}` for the class name; empty: `a photo of a {}.`"""
    max_samples: int = 0
    """Evaluate on at most this many validation samples per rank (0: all)."""


@dataclass
class TrainRunConfig:
    """A whole pretraining or fine-tuning run."""

    output_dir: str = "runs/mmscale"
    """Run directory: config.yaml, checkpoints/, final/, metrics.jsonl, tensorboard/, plots."""
    tokenizer: str = ""
    """Tokenizer folder (Hugging Face format, e.g. from tools/train_tokenizer.py); empty: the one in model.init_from or model.text_from."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    vqa: VqaSettings = field(default_factory=VqaSettings)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self):
        if self.model.quantize_base and not self.lora.enabled:
            raise ValueError(f"model.quantize_base={self.model.quantize_base} freezes the base in low bits, which "
                             "only LoRA adapters can train over: set lora.enabled=true (configs/finetune/lora.yaml) "
                             "or leave model.quantize_base empty")
        if self.loss.itm_negatives == "global" and self.data.pad_to_longest:
            raise ValueError("loss.itm_negatives=global gathers every rank's captions, which needs one caption "
                             "length on every rank: set data.pad_to_longest=false (captions padded to "
                             "data.context_length)")
