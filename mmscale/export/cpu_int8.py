"""`--quantize int8-cpu`: the towers' linear layers as PyTorch dynamic int8 (fbgemm / oneDNN through the `x86`
quantized engine), the fast path for CPU inference.

Weights are int8, symmetric per output channel (one fp32 scale per row, zero point 0); activations are quantized
per batch on the fly. On one 768x3072 layer this ran ~2x faster than fp32 on an AVX2 machine (issue 29), where
bitsandbytes' int8 was slower than fp32; torchao's int8 without `torch.compile` measured slower than this
(tools/bench/compress.py has the whole-model figures).

Saved form: `model_int8_cpu.safetensors` holds every tensor of the towers, each quantized layer as `NAME.weight`
(int8) + `NAME.weight_scale` (fp32) + `NAME.bias`; there is no `model.safetensors`, so plain
`transformers.AutoModel.from_pretrained` refuses the folder instead of loading int8 values as floats.
`mmscale.models.load_model` sees `"quantize": "int8-cpu"` in mmscale.json and calls `load_towers`. This module
imports nothing from mmscale, so the model loader can use it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.ao.nn.quantized.dynamic as quantized_dynamic
from safetensors.torch import load_file, save_file
from torch import nn

QUANTIZE = "int8-cpu"
WEIGHTS_FILE = "model_int8_cpu.safetensors"
_SCALE = ".weight_scale"


class CpuInt8Linear(quantized_dynamic.Linear):
    """A dynamically quantized int8 linear layer that says what to do when given a tensor off the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError(f"an int8-cpu model runs on the CPU only (PyTorch dynamic int8), but got input on "
                               f"{x.device}; run it with CUDA_VISIBLE_DEVICES= (no GPU), or export with "
                               "--quantize int8 or nf4 (bitsandbytes) for a GPU")
        return super().forward(x)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, fp32 scale per output row) of a float [out, in] weight: symmetric, `round(w / scale)` in
    [-127, 127] with scale = max|row| / 127."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    values = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return values, scale


def int8_linear(values: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> CpuInt8Linear:
    """The layer of int8 `values` [out, in] and fp32 per-row `scale`, prepacked for the current quantized engine."""
    out_features, in_features = values.shape
    with warnings.catch_warnings():  # deprecated in torch (pytorch/pytorch#184982), still the way in
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        layer = CpuInt8Linear(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
        zero_points = torch.zeros_like(scale, dtype=torch.long)
        weight = torch._make_per_channel_quantized_tensor(values, scale.double(), zero_points, 0)
    layer.set_weight_bias(weight, None if bias is None else bias.detach().float().contiguous())
    return layer


def quantize_towers(towers: nn.Module, *, keep: tuple[str, ...]) -> list[str]:
    """Replace, in place, every `nn.Linear` of `towers` except those named in `keep` (and their children) by its
    int8 `CpuInt8Linear`; returns the replaced layers' names."""
    names = [name for name, module in towers.named_modules() if type(module) is nn.Linear
             and not any(name == kept or name.startswith(kept + ".") for kept in keep)]
    for name in names:
        linear = towers.get_submodule(name)
        values, scale = quantize_weight(linear.weight)
        _replace(towers, name, int8_linear(values, scale, linear.bias))
    return names


def save_towers(towers: nn.Module, folder: Path) -> Path:
    """Write the quantized towers' tensors to `folder/model_int8_cpu.safetensors` (the config is written by the
    float save beside it). Float tensors keep their dtype; each int8 layer is `.weight`, `.weight_scale`, `.bias`."""
    layers = {name: module for name, module in towers.named_modules() if isinstance(module, CpuInt8Linear)}
    tensors = {name: tensor.detach().contiguous() for name, tensor in towers.state_dict().items()
               if not any(name.startswith(layer + ".") for layer in layers)}
    for name, layer in layers.items():
        weight, bias = layer._weight_bias()
        tensors[f"{name}.weight"] = weight.int_repr().contiguous()
        tensors[f"{name}{_SCALE}"] = weight.q_per_channel_scales().float().contiguous()
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous()
    path = Path(folder) / WEIGHTS_FILE
    save_file(tensors, path, metadata={"format": "pt", "quantize": QUANTIZE})
    return path


def load_towers(folder: Path, tower_class: type, *, attention: str) -> nn.Module:
    """The towers of an int8-cpu folder: `tower_class` built from its config.json (weights uninitialized), the
    int8 layers rebuilt from their values and scales, every other tensor loaded; a tensor missing or left over
    is an error naming it."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} says it is an int8-cpu export but has no {WEIGHTS_FILE}; export it again")
    tensors = load_file(path)
    config = tower_class.config_class.from_pretrained(folder, local_files_only=True)
    towers = _empty_towers(tower_class, config, attention)
    layers = {name.removesuffix(_SCALE) for name in tensors if name.endswith(_SCALE)}
    quantized = {name: tensors.pop(name) for name in list(tensors) if name.rpartition(".")[0] in layers}
    result = towers.load_state_dict(tensors, strict=False)
    missing = [key for key in result.missing_keys if key not in quantized]
    if missing or result.unexpected_keys or not layers <= {name for name, _ in towers.named_modules()}:
        raise ValueError(f"{path}: does not match the model of {folder / 'config.json'} (missing "
                         f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}); export it again")
    for name in sorted(layers):
        _replace(towers, name, int8_linear(quantized[f"{name}.weight"], quantized[f"{name}{_SCALE}"].float(),
                                           quantized.get(f"{name}.bias")))
    return towers.eval()


def _empty_towers(tower_class: type, config, attention: str) -> nn.Module:
    """The towers without weight initialization (every weight is loaded after), as from_pretrained builds them."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # an older transformers: initialize, only slower
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        return tower_class._from_config(config, attn_implementation=attention)


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
