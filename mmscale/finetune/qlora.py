"""QLoRA (arXiv:2305.14314): LoRA adapters trained over a frozen base whose transformer layers are low-bit.

`model.quantize_base=int8|nf4` swaps every linear layer inside the towers' transformer layers for a bitsandbytes
`Linear8bitLt` (LLM.int8, arXiv:2208.07339) or `Linear4bit` (NF4 with double-quantized block scales, the format of
`mmscale export --quantize nf4`) before `apply_lora` wraps the towers; PEFT then puts its bitsandbytes LoRA layers
on the targeted ones, as it does on a model `from_pretrained(..., quantization_config=...)` loaded. Embeddings,
norms, poolers, the projections and every head stay float and, as in any LoRA run, the heads train. What
`prepare_model_for_kbit_training` adds beyond that is not needed here: the base is built in fp32 (so its norms are
float already) and gradient checkpointing is non-reentrant (so the inputs need no gradient).

The quantized weights are only the training copy: the run's `final/` merges the adapters into the float base read
again from its source (train/loop.py `_finish`), never into a dequantized one.
"""

from __future__ import annotations

import os
import re

import torch

from mmscale.models.base import ImageTextModel

QUANTIZE_BASE = ("int8", "nf4")
# LLM.int8's outlier threshold: transformers' BitsAndBytesConfig default, so the same layers as `--quantize int8`.
INT8_THRESHOLD = 6.0
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def quantized_layer_names(model: ImageTextModel) -> list[str]:
    """The towers' linear layers inside transformer layers (`<tower>...encoder.layer[s].N...`), by module name."""
    inside = re.compile(rf"^({'|'.join(map(re.escape, model.tower_names))})\.(.+\.)?encoder\.layers?\.\d+\.")
    return [name for name, module in model.towers.named_modules()
            if type(module) is torch.nn.Linear and inside.match(name)]


def check_quantize_base(kind: str, device: torch.device) -> None:
    """Refuse `model.quantize_base=kind` where bitsandbytes cannot train through its layers on `device`: one tiny
    layer's forward and backward, run before the process group starts so the error is the user's, not a rank's."""
    try:
        import bitsandbytes
    except ImportError:
        raise ValueError(f"model.quantize_base={kind} needs bitsandbytes: pip install bitsandbytes (0.50.2 trains "
                         "int8 and nf4 on CPU too); or leave model.quantize_base unset for a float base") from None
    try:
        probe = _low_bit(torch.nn.Linear(64, 64), kind, compute_dtype=torch.float32, device=device)
        probe(torch.randn(2, 64, device=device, requires_grad=True)).sum().backward()
    except Exception as error:  # noqa: BLE001  # any failure means this bitsandbytes cannot train here
        layer = "Linear8bitLt" if kind == "int8" else "Linear4bit"
        raise ValueError(f"model.quantize_base={kind}: bitsandbytes {bitsandbytes.__version__} cannot train through "
                         f"{layer} on {device.type} ({type(error).__name__}: {error}); install a bitsandbytes with "
                         "a backend for this device (0.50.2 trains both on CPU) or leave model.quantize_base "
                         "unset") from None


def quantize_base(model: ImageTextModel, kind: str, *, compute_dtype: torch.dtype, device: torch.device) -> list[str]:
    """Replace, in place, the towers' transformer-layer linear layers by frozen bitsandbytes layers of `kind`
    (int8 or nf4) on `device`, computing in `compute_dtype` (nf4; int8 computes in its input's dtype); returns
    their names. Marks the towers as PEFT reads a quantized model, so its bitsandbytes LoRA layers wrap them."""
    names = quantized_layer_names(model)
    for tower in model.tower_names:
        if not any(name.startswith(tower + ".") for name in names):
            model_type = getattr(model.towers, tower).config.model_type
            raise ValueError(f"model.quantize_base={kind}: the {tower} tower ({model_type}) has no linear layers "
                             "under encoder.layer(s) to quantize; leave model.quantize_base unset for this model")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.towers.get_submodule(parent)
        setattr(owner, child, _low_bit(getattr(owner, child), kind, compute_dtype=compute_dtype, device=device))
    setattr(model.towers, "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit", True)
    return names


def _low_bit(linear: torch.nn.Linear, kind: str, *, compute_dtype: torch.dtype, device: torch.device):
    """A frozen bitsandbytes copy of `linear`, its weight quantized as it moves to `device`."""
    import bitsandbytes as bnb

    weight = linear.weight.detach()
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4").to(device)
        layer.register_load_state_dict_pre_hook(_keep_quantization_state)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    return layer


def _keep_quantization_state(module, state_dict: dict, prefix: str, *args) -> None:
    """Resuming: Linear4bit saves its quantization state (block scales, code book) beside the packed weight but
    cannot load it back (transformers rebuilds it when loading, a plain `load_state_dict` calls it unexpected). The
    layer already holds the same state, quantized from the same frozen source at setup, so the saved copy is
    dropped; the packed weight itself loads as any tensor."""
    for key in [key for key in state_dict if key.startswith(f"{prefix}weight.")]:
        del state_dict[key]


def training_device() -> torch.device:
    """The device this rank trains on, known before the process group starts (the launcher's LOCAL_RANK)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
