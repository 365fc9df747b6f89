"""QLoRA: LoRA over a frozen bitsandbytes int8/nf4 base, through the training loop; final/ is the float base plus
the merged adapters."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from test_finetune import data, finetune  # noqa: F401  # `data`: the module's shards, tokenizer and float base

from mmscale.config import ConfigError, load_config
from mmscale.finetune.lora import LoraSettings, apply_lora
from mmscale.finetune.qlora import check_quantize_base, quantize_base, quantized_layer_names
from mmscale.models import ModelConfig, build_model
from mmscale.train.config import TrainRunConfig

bnb = pytest.importorskip("bitsandbytes")
LOW_BIT = {"int8": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit}


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_the_quantized_base_stays_frozen_while_adapters_and_heads_get_gradients(kind):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"), vocab_size=200)
    names = quantized_layer_names(model)
    # every linear layer of the transformer layers (4 attention + 2 MLP, 4 layers, 2 towers), nothing else
    assert len(names) == 48 and not any("pooler" in name or "projection" in name for name in names)
    quantize_base(model, kind, compute_dtype=torch.float32, device=torch.device("cpu"))
    apply_lora(model, LoraSettings(enabled=True))
    towers = model.towers.base_model.model
    query = towers.text_model.encoder.layer[0].attention.self.query
    fc1 = towers.vision_model.encoder.layers[0].mlp.fc1
    assert isinstance(query.base_layer, LOW_BIT[kind]) and isinstance(fc1, LOW_BIT[kind])  # adapted, and not
    assert type(towers.visual_projection.modules_to_save["default"]) is torch.nn.Linear
    assert towers.text_model.embeddings.word_embeddings.weight.dtype == torch.float32
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    ids = torch.randint(5, 200, (2, 12))
    (model.encode_images(images).sum() + model.encode_texts(ids, torch.ones_like(ids)).sum()).backward()
    low_bit = [module for module in towers.modules() if isinstance(module, LOW_BIT[kind])]
    assert len(low_bit) == 48
    assert all(not p.requires_grad and p.grad is None for module in low_bit for p in module.parameters())
    assert query.lora_A["default"].weight.grad is not None
    assert towers.visual_projection.modules_to_save["default"].weight.grad is not None


def test_a_fusion_model_quantizes_its_cross_attention_and_trains_adapters_through_itm():
    """QLoRA of a BLIP-style fusion model: the text encoder's cross-attention layers are quantized with the rest,
    and the image-text matching logits carry gradient to the adapters while the low-bit base stays frozen."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", fusion_layers=4), vocab_size=200, mlm_head=False,
                        token_ids={"pad": 0, "cls": 2, "sep": 3})
    names = quantize_base(model, "nf4", compute_dtype=torch.float32, device=torch.device("cpu"))
    assert any(".crossattention." in name for name in names)
    apply_lora(model, LoraSettings(enabled=True))
    images = torch.randint(0, 255, (2, 3, model.image_size, model.image_size), dtype=torch.uint8)
    ids = torch.randint(5, 200, (2, 12))
    model.itm_scores(images, ids, torch.ones_like(ids)).sum().backward()
    low_bit = [module for module in model.towers.modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert len(low_bit) == len(names)
    assert all(not p.requires_grad and p.grad is None for module in low_bit for p in module.parameters())
    adapters = [p for name, p in model.towers.named_parameters() if "lora_" in name]
    assert adapters and any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)


@pytest.mark.slow
@pytest.mark.parametrize("kind,precision", [("int8", "fp32"), ("nf4", "bf16")])
def test_qlora_run_saves_float_base_plus_merged_adapters(data, tmp_path, kind, precision):  # noqa: F811
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    run = tmp_path / "run"
    settings = (f"model.quantize_base={kind}", f"train.precision={precision}")
    if kind == "nf4":  # and resumed: Linear4bit cannot load the quantization state it saves (qlora.py)
        finetune(str(data["base"]), data, run, *settings, "train.samples=32")
    result = finetune(str(data["base"]), data, run, *settings, "train.samples=64")
    assert f"48 transformer-layer linear layers in bitsandbytes {kind}" in result.stdout
    assert ("resumed from" in result.stdout) == (kind == "nf4")
    # What trained: the checkpoint holds the module as it trained, its base layers in int8 / packed 4-bit...
    saved = torch.load(next((run / "checkpoints").glob("step*/mp_rank_00_model_states.pt")), map_location="cpu",
                       weights_only=False)
    query = "model.towers.base_model.model.text_model.encoder.layer.0.attention.self.query.base_layer.weight"
    assert saved["module"][query].dtype == (torch.int8 if kind == "int8" else torch.uint8)
    # ...and the adapters moved off their zero start.
    adapters = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in adapters.values())
    assert all(tensor.abs().max() > 0 for name, tensor in adapters.items() if "lora_B" in name)
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(data["base"])
    # final/ is a plain float model: the float base with the adapters merged (not a dequantized base).
    final = AutoModel.from_pretrained(run / "final")
    assert "quantization_config" not in json.loads((run / "final" / "config.json").read_text())
    expected = PeftModel.from_pretrained(AutoModel.from_pretrained(data["base"]), run / "adapter").merge_and_unload()
    ours, theirs = final.state_dict(), expected.state_dict()
    assert ours.keys() == theirs.keys() and {tensor.dtype for tensor in ours.values()} == {torch.float32}
    for name in ours:
        if name != "logit_scale":  # trains outside the adapter (saved beside it, tested in test_finetune)
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    merged_query = "text_model.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(ours[merged_query], AutoModel.from_pretrained(data["base"]).state_dict()[merged_query])


def test_quantize_base_config_errors():
    with pytest.raises(ConfigError, match="model.quantize_base 'int4' is unknown; choose int8 or nf4"):
        load_config(TrainRunConfig, None, ["model.quantize_base=int4", "lora.enabled=true", "model.init_from=x"])
    with pytest.raises(ConfigError, match="a new model has none: set model.init_from"):
        load_config(TrainRunConfig, None, ["model.quantize_base=nf4", "lora.enabled=true"])
    with pytest.raises(ConfigError, match="only LoRA adapters can train over: set lora.enabled=true"):
        load_config(TrainRunConfig, None, ["model.quantize_base=int8", "model.init_from=x"])


def test_quantize_base_without_bitsandbytes_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed: the import fails
    with pytest.raises(ValueError, match="model.quantize_base=nf4 needs bitsandbytes: pip install bitsandbytes"):
        check_quantize_base("nf4", torch.device("cpu"))


def test_quantize_base_where_bitsandbytes_cannot_train_says_so_before_the_run(monkeypatch):
    def unsupported(self, inputs):
        raise NotImplementedError("no backward kernel for this device")

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", unsupported)
    with pytest.raises(ValueError, match=r"model.quantize_base=nf4: bitsandbytes .* cannot train through Linear4bit "
                                         r"on cpu \(NotImplementedError: no backward kernel"):
        check_quantize_base("nf4", torch.device("cpu"))
    check_quantize_base("int8", torch.device("cpu"))  # this bitsandbytes trains through both on CPU
