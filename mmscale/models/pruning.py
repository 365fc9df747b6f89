"""Structured pruning on the model side: where each transformer layer's attention heads and MLP neurons are, how
important each one is, and taking them out.

An MLP neuron comes out for real: the layer's two MLP matrices lose that row and column and the tower's
`intermediate_size` shrinks, so the result is a smaller plain `transformers` model. An attention head cannot: CLIP
and BERT attention in transformers 5 is always `hidden_size` wide (it dropped `pruned_heads`), so a removed head
keeps its place with its query, key, value and output weights at zero. That is exact in plain transformers (a head
whose values are zero adds nothing), but neither smaller nor faster. mmscale.json lists the removed heads
(`pruned_heads`), and mmscale zeroes their values in every forward it runs. An all-zero head is a fixed point of
full fine-tuning already (no gradient reaches it), but LoRA adapters on both its values and the output projection
would grow it back once the output adapter has learned something; with its values masked, none can.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Per layer type: (query, key, value, attention output, MLP in, MLP out), as paths inside the layer.
LAYOUTS = {
    "clip": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"),
    "bert": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"),
}
QUERY, KEY, VALUE, OUTPUT, MLP_IN, MLP_OUT = range(6)


@dataclass
class EncoderLayer:
    """One transformer layer of a tower and the paths of its projections inside it."""

    module: nn.Module
    paths: tuple[str, ...]
    heads: int

    def part(self, index: int) -> nn.Module:
        return self.module.get_submodule(self.paths[index])

    def replace(self, index: int, new: nn.Module) -> None:
        parent, _, name = self.paths[index].rpartition(".")
        setattr(self.module.get_submodule(parent), name, new)

    @property
    def head_width(self) -> int:
        return self.part(QUERY).out_features // self.heads


def _resolves(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def encoder_layers(tower: nn.Module) -> list[EncoderLayer]:
    """The tower's transformer layers in order, each with its layout (LAYOUTS); [] for a tower of another kind."""
    heads = tower.config.num_attention_heads
    layers = []
    for _, module in tower.named_modules():
        layout = next((paths for paths in LAYOUTS.values() if all(_resolves(module, path) for path in paths)), None)
        if layout is not None:
            layers.append(EncoderLayer(module, layout, heads))
    return layers


def tower_layers(model) -> dict[str, list[EncoderLayer]]:
    """{"vision": layers, "text": layers} of a dual encoder, or a clear error for towers pruning does not know."""
    towers = {}
    for side, name in zip(("vision", "text"), model.tower_names):
        tower = getattr(model.towers, name)
        layers = encoder_layers(tower)
        if not layers:
            raise ValueError(f"pruning knows CLIP and BERT layers; the {side} tower ({tower.config.model_type}) has "
                             "neither")
        towers[side] = layers
    return towers


@dataclass
class Importance:
    """How much each head and MLP neuron of one layer contributes: larger is kept."""

    heads: torch.Tensor
    neurons: torch.Tensor


def weight_importance(layer: EncoderLayer) -> Importance:
    """Without data: a head's value-weight norm times its output-weight norm; a neuron's input-row norm times its
    output-column norm (what the unit can pass on, whatever comes in)."""
    width = layer.head_width
    value, output = layer.part(VALUE).weight.float(), layer.part(OUTPUT).weight.float()
    heads = value.view(layer.heads, width, -1).norm(dim=(1, 2)) * output.view(output.shape[0], layer.heads, width).norm(dim=(0, 2))
    neurons = layer.part(MLP_IN).weight.float().norm(dim=1) * layer.part(MLP_OUT).weight.float().norm(dim=0)
    return Importance(heads, neurons)


class ActivationImportance:
    """With data: a head's mean output norm (its slice of the attention context) times its output-weight norm; a
    neuron's mean absolute activation times its output-column norm, over every token of the batches run while
    this is open (`with ActivationImportance(layers) as meter: model.encode_images(...)`)."""

    def __init__(self, layers: list[EncoderLayer]):
        self.layers = layers
        self.head_sums = [torch.zeros(layer.heads) for layer in layers]
        self.neuron_sums = [torch.zeros(layer.part(MLP_OUT).in_features) for layer in layers]
        self.tokens = [0] * len(layers)
        self.handles = []

    def __enter__(self) -> ActivationImportance:
        for index, layer in enumerate(self.layers):
            self.handles.append(layer.part(OUTPUT).register_forward_pre_hook(self._count_heads(index)))
            self.handles.append(layer.part(MLP_OUT).register_forward_pre_hook(self._count_neurons(index)))
        return self

    def __exit__(self, *exception) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _count_heads(self, index: int):
        layer = self.layers[index]

        def hook(module, inputs):
            context = inputs[0].detach().float()
            per_head = context.reshape(-1, layer.heads, context.shape[-1] // layer.heads).norm(dim=-1)
            self.head_sums[index] += per_head.sum(dim=0).cpu()
            self.tokens[index] += per_head.shape[0]
        return hook

    def _count_neurons(self, index: int):
        def hook(module, inputs):
            activation = inputs[0].detach().float()
            self.neuron_sums[index] += activation.abs().reshape(-1, activation.shape[-1]).sum(dim=0).cpu()
        return hook

    def importance(self) -> list[Importance]:
        if not all(self.tokens):
            raise ValueError("no calibration batch reached every layer; give --data with at least one sample")
        scores = []
        for layer, heads, neurons, tokens in zip(self.layers, self.head_sums, self.neuron_sums, self.tokens):
            output = layer.part(OUTPUT).weight.float().cpu()
            head_norms = output.view(output.shape[0], layer.heads, layer.head_width).norm(dim=(0, 2))
            scores.append(Importance(heads / tokens * head_norms,
                                     neurons / tokens * layer.part(MLP_OUT).weight.float().cpu().norm(dim=0)))
        return scores


def removed_count(total: int, fraction: float, what: str) -> int:
    """How many of `total` units per layer `fraction` removes: rounded, at least one kept."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the fraction of {what} to remove must be in [0, 1), got {fraction}")
    count = round(total * fraction)
    if fraction > 0 and count == 0:
        raise ValueError(f"removing {fraction:.0%} of {total} {what} per layer rounds to none; remove at least "
                         f"{1 / total:.0%} or leave it at 0")
    return min(count, total - 1)


def remove_neurons(layer: EncoderLayer, keep: torch.Tensor) -> None:
    """Keep only the MLP neurons at the (sorted) indices `keep`: both MLP matrices get smaller."""
    first, second = layer.part(MLP_IN), layer.part(MLP_OUT)
    keep = keep.to(first.weight.device)
    smaller_first = nn.Linear(first.in_features, len(keep), bias=first.bias is not None, device=first.weight.device,
                              dtype=first.weight.dtype)
    smaller_second = nn.Linear(len(keep), second.out_features, bias=second.bias is not None,
                               device=second.weight.device, dtype=second.weight.dtype)
    with torch.no_grad():
        smaller_first.weight.copy_(first.weight[keep])
        if first.bias is not None:
            smaller_first.bias.copy_(first.bias[keep])
        smaller_second.weight.copy_(second.weight[:, keep])
        if second.bias is not None:
            smaller_second.bias.copy_(second.bias)
    layer.replace(MLP_IN, smaller_first)
    layer.replace(MLP_OUT, smaller_second)


@torch.no_grad()
def zero_heads(layer: EncoderLayer, heads: list[int]) -> None:
    """The query, key and value rows and the output columns of `heads` set to zero (biases too)."""
    width = layer.head_width
    for head in heads:
        rows = slice(head * width, (head + 1) * width)
        for index in (QUERY, KEY, VALUE):
            part = _base_linear(layer.part(index))
            part.weight[rows] = 0
            if part.bias is not None:
                part.bias[rows] = 0
        _base_linear(layer.part(OUTPUT)).weight[:, rows] = 0


def _base_linear(module: nn.Module) -> nn.Module:
    """The plain layer under a PEFT LoRA wrapper (merged or not), or the module itself."""
    return getattr(module, "base_layer", module)


def pruned_heads_of(layers: dict[str, list[EncoderLayer]], pruned: dict) -> dict[str, dict[int, list[int]]]:
    """`pruned` (as mmscale.json keeps it: string layer indices) checked against the towers, as ints."""
    checked = {}
    for side, by_layer in (pruned or {}).items():
        if side not in layers:
            raise ValueError(f"pruned_heads names a {side!r} tower; this model has {sorted(layers)}")
        checked[side] = {}
        for index, heads in by_layer.items():
            index = int(index)
            if not 0 <= index < len(layers[side]) or any(not 0 <= h < layers[side][index].heads for h in heads):
                raise ValueError(f"pruned_heads: {side} layer {index} heads {heads} are not in this model")
            checked[side][index] = sorted(int(head) for head in heads)
    return checked


def keep_heads_removed(model) -> None:
    """(Re)register the hooks that zero the removed heads' values (`model.pruned_heads`) in every forward, on the
    value projections as they are now (call again after PEFT wraps them, so the adapter's part is zeroed too)."""
    for handle in model.pruned_head_hooks:
        handle.remove()
    model.pruned_head_hooks = []
    if not model.pruned_heads:
        return
    layers = tower_layers(model)
    for side, by_layer in model.pruned_heads.items():
        for index, heads in by_layer.items():
            layer = layers[side][index]
            model.pruned_head_hooks.append(layer.part(VALUE).register_forward_hook(_zero_values(layer.heads, heads)))


def _zero_values(heads: int, removed: list[int]):
    masks = {}

    def hook(module, inputs, output):
        key = (output.device, output.dtype)
        if key not in masks:  # made once per device: no host-to-device copy in the training steps
            keep = torch.ones(heads, dtype=output.dtype)
            keep[removed] = 0
            masks[key] = keep.repeat_interleave(output.shape[-1] // heads).to(output.device)
        return output * masks[key]
    return hook


def zero_pruned_heads(model) -> None:
    """Set the removed heads' weights back to zero (before saving: an adapter on the output projection may have
    moved their output columns, which read only zeros in training, so the function is unchanged)."""
    if not model.pruned_heads:
        return
    layers = tower_layers(model)
    for side, by_layer in model.pruned_heads.items():
        for index, heads in by_layer.items():
            zero_heads(layers[side][index], heads)
