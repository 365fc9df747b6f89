"""Presets, sizes, the FLOP count, the MLM head and the objective on one process."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mmscale.config import ConfigError, load_config
from mmscale.data.text import IGNORE_INDEX
from mmscale.losses import LossConfig, PretrainingObjective, mlm_loss
from mmscale.models import PRESETS, ModelConfig, build_model, training_flops_per_sample
from mmscale.models.config import resolve_attention
from mmscale.models.dual_encoder import clamp_returnable

VOCAB = 400


def batch(size: int = 4, *, image_size: int = 64, context: int = 16, masked: int = 3, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (size, context), generator=generator)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, 1:1 + masked] = input_ids[:, 1:1 + masked]
    mlm_input_ids = input_ids.clone()
    mlm_input_ids[:, 1:1 + masked] = 4
    return {"images": torch.randint(0, 256, (size, 3, image_size, image_size), dtype=torch.uint8, generator=generator),
            "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "mlm_input_ids": mlm_input_ids, "mlm_labels": labels}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny"), vocab_size=VOCAB)


# Parameter counts of the towers these presets are named after (ViT-B/16 86 M, BERT-base 110 M, ...).
EXPECTED_MILLIONS = {"tiny": (2, 5), "base": (190, 205), "large": (620, 660), "huge": (940, 1000),
                     "giant": (2400, 2600)}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_instantiates_on_the_meta_device(preset):
    with torch.device("meta"):
        model = build_model(ModelConfig(preset=preset))
    parameters = {id(p): p for p in model.parameters()}.values()
    assert all(p.is_meta for p in parameters)
    low, high = EXPECTED_MILLIONS[preset]
    assert low <= sum(p.numel() for p in parameters) / 1e6 <= high
    assert model.mlm_head.decoder.weight is model.towers.text_model.get_input_embeddings().weight


def test_sizes_are_overridable_field_by_field_from_yaml(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("preset: base\ntext_layers: 6\nvision_width: 512\nvision_heads: 8\n")
    config = load_config(ModelConfig, path, ["projection_dim=256"])
    sizes = config.sizes(vocab_size=1000)
    assert (sizes.text_layers, sizes.vision_width, sizes.projection_dim, sizes.vocab_size) == (6, 512, 256, 1000)
    assert sizes.vision_layers == PRESETS["base"].vision_layers
    assert ModelConfig(preset="base", vocab_size=777).sizes(vocab_size=1000).vocab_size == 777


@pytest.mark.parametrize("overrides, message", [
    (["preset=medium"], "model.preset 'medium' is unknown"),
    (["vision_width=130"], "multiple of model.vision_heads"),
    (["image_size=60"], "multiple of model.patch_size"),
    (["vision_from=a"], "go together"),
    (["temperature_init=0.001"], "max_logit_scale"),
])
def test_bad_model_configs_say_what_is_wrong(overrides, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        load_config(ModelConfig, None, overrides).sizes()


def test_flop_count_matches_torch_flop_counter_on_tiny():
    # Eager attention: the CPU's fused attention kernel is not in the flop counter's table, so
    # with sdpa the counter would miss the attention matmuls that the formula includes.
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", attention="eager"), vocab_size=VOCAB)
    objective = PretrainingObjective(model, LossConfig())
    inputs = batch(8, context=64, masked=10)
    with FlopCounterMode(display=False) as counter:
        objective(**inputs).total.backward()
    predicted = 8 * training_flops_per_sample(model, context_length=64, masked_tokens=10, contrastive_batch_size=8)
    assert predicted == pytest.approx(counter.get_total_flops(), rel=0.10)
    without_mlm = training_flops_per_sample(model, context_length=64, masked_tokens=0, contrastive_batch_size=8)
    assert without_mlm < predicted / 8 * 0.75  # the masked text pass and the head are a large share


def test_mlm_loss_counts_masked_positions_only(tiny):
    inputs = batch(4, masked=3)
    logits, targets = tiny.mlm_logits(inputs["mlm_input_ids"], inputs["attention_mask"], inputs["mlm_labels"])
    assert logits.shape == (12, VOCAB) and torch.equal(targets, inputs["mlm_labels"][:, 1:4].flatten())
    hidden = tiny.towers.text_model(input_ids=inputs["mlm_input_ids"],
                                    attention_mask=inputs["attention_mask"]).last_hidden_state
    every_position = tiny.mlm_head(hidden)
    reference = F.cross_entropy(every_position.flatten(0, 1), inputs["mlm_labels"].flatten(), ignore_index=IGNORE_INDEX)
    assert mlm_loss(logits, targets).item() == pytest.approx(reference.item(), rel=1e-5)
    # A prediction made at an unmasked position is not scored: only a label there changes the loss.
    relabelled = inputs["mlm_labels"].clone()
    relabelled[:, 8] = inputs["input_ids"][:, 8]
    more_logits, more_targets = tiny.mlm_logits(inputs["mlm_input_ids"], inputs["attention_mask"], relabelled)
    assert more_logits.shape[0] == 16
    assert mlm_loss(more_logits, more_targets).item() != pytest.approx(reference.item(), rel=1e-5)


def test_a_batch_without_masked_tokens_gives_zero_mlm_loss_and_finite_gradients(tiny):
    inputs = batch(2)
    inputs["mlm_labels"].fill_(IGNORE_INDEX)
    tiny.zero_grad()
    out = PretrainingObjective(tiny, LossConfig())(**inputs)
    assert out.mlm.item() == 0.0 and math.isfinite(out.total.item())
    out.total.backward()
    assert tiny.mlm_head.dense.weight.grad is not None  # the head ran, as on every other rank
    assert all(torch.isfinite(p.grad).all() for p in tiny.parameters() if p.grad is not None)


def test_temperature_is_clamped_in_forward_not_in_the_parameter(tiny):
    with torch.no_grad():
        tiny.towers.logit_scale.fill_(math.log(1000.0))
    try:
        assert tiny.logit_scale().item() == pytest.approx(100.0)
        assert tiny.towers.logit_scale.item() == pytest.approx(math.log(1000.0))
    finally:
        with torch.no_grad():
            tiny.towers.logit_scale.fill_(math.log(1 / 0.07))


def test_a_temperature_beyond_the_bound_can_come_back():
    # The logit scale crossed its bound (1/temperature = 100): the forward value stays at the bound, a
    # gradient that asks for a larger scale is zeroed, and one that asks for a smaller scale gets through.
    for wants_smaller, moves in ((True, True), (False, False)):
        parameter = torch.nn.Parameter(torch.tensor(math.log(120.0)))
        optimizer = torch.optim.SGD([parameter], lr=0.05)
        for _ in range(10):
            scale = clamp_returnable(parameter, math.log(100.0)).exp()
            assert scale.item() == pytest.approx(min(100.0, parameter.exp().item()), rel=1e-6)
            optimizer.zero_grad()
            (scale if wants_smaller else -scale).backward()
            optimizer.step()
        assert (parameter.exp().item() < 100.0) == moves
        assert parameter.exp().item() <= 120.0 + 1e-4  # never pushed further up
    # A plain clamp has no gradient there: the scale could never come back.
    parameter = torch.nn.Parameter(torch.tensor(math.log(120.0)))
    parameter.clamp(max=math.log(100.0)).exp().backward()
    assert parameter.grad.item() == 0.0


def test_first_contrastive_loss_is_near_log_batch(tiny):
    out = PretrainingObjective(tiny, LossConfig())(**batch(16))
    assert abs(out.contrastive.item() - math.log(16)) < 1.0
    assert out.total.item() == pytest.approx(out.contrastive.item() + LossConfig().mlm_weight * out.mlm.item(), rel=1e-6)
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-4)


def test_images_of_the_wrong_size_are_refused_with_the_fix(tiny):
    with pytest.raises(ValueError, match="set data.image_size=64"):
        tiny.encode_images(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_objective_refuses_what_the_model_cannot_do(tiny):
    with pytest.raises(ValueError, match="needs a model built with a logit bias"):
        PretrainingObjective(tiny, LossConfig(contrastive="siglip"))
    no_head = build_model(ModelConfig(preset="tiny"), vocab_size=VOCAB, mlm_head=False)
    with pytest.raises(ValueError, match="set loss.mlm_weight=0"):
        PretrainingObjective(no_head, LossConfig())
    out = PretrainingObjective(no_head, LossConfig(mlm_weight=0))(**batch(2))
    assert out.mlm.item() == 0.0


def test_new_towers_give_captions_that_differ_in_one_word_different_features():
    """Hugging Face's BERT init (std 0.02 everywhere) made such captions' features nearly identical
    (mean cosine 0.9997 on tiny) and the contrastive loss sat at ln(batch) (issue 11); open_clip's
    init (mmscale.models.init) must leave them clearly apart."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"), vocab_size=VOCAB, mlm_head=False).eval()
    template = torch.tensor([2, 11, 12, 13, 0, 3])  # [CLS] a picture of <class> [SEP]
    input_ids = template.repeat(10, 1)
    input_ids[:, 4] = torch.arange(20, 30)
    with torch.no_grad():
        unit = F.normalize(model.encode_texts(input_ids, torch.ones_like(input_ids)), dim=-1)
    spread = ((unit @ unit.T).sum() - 10) / 90  # mean pairwise cosine of the 10 captions
    assert spread < 0.99
    width = model.towers.config.text_config.hidden_size
    query = model.towers.text_model.encoder.layer[0].attention.self.query.weight
    assert query.std().item() == pytest.approx(width ** -0.5, rel=0.1)  # unit-gain attention, as open_clip


def test_a_loaded_model_keeps_its_weights(tmp_path):
    """The new-tower init applies to new models only: a saved folder loads back bit for bit."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"), vocab_size=VOCAB)
    model.save(tmp_path / "model")
    loaded = build_model(ModelConfig(preset="tiny", init_from=str(tmp_path / "model")))
    for (name, ours), (_, theirs) in zip(model.towers.state_dict().items(), loaded.towers.state_dict().items()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=name)


def test_one_text_pass_gives_the_saved_models_text_features_and_the_masked_logits(tiny):
    """Clean and masked captions go through the text tower as one batch: the features are
    get_text_features' (what the saved model gives) and the MLM logits those of a pass of their own."""
    from mmscale.data.text import masked_positions

    inputs = batch(4, masked=3)
    inputs["attention_mask"][0, 10:] = 0  # padded captions: the mask is applied alike in both passes
    inputs["attention_mask"][2, 6:] = 0
    tiny.eval()
    with torch.no_grad():
        positions, targets = masked_positions(inputs["mlm_labels"])
        out = tiny(inputs["images"], inputs["input_ids"], inputs["attention_mask"], inputs["mlm_input_ids"],
                   mlm_positions=positions, mlm_targets=targets)
        expected = tiny.towers.get_text_features(input_ids=inputs["input_ids"],
                                                 attention_mask=inputs["attention_mask"]).pooler_output
        torch.testing.assert_close(out.text_features, expected, rtol=1e-4, atol=1e-5)
        logits, labelled = tiny.mlm_logits(inputs["mlm_input_ids"], inputs["attention_mask"], inputs["mlm_labels"])
        real = targets != IGNORE_INDEX
        assert len(positions) == 16 and int(real.sum()) == 12  # padded to a multiple of 16
        torch.testing.assert_close(out.mlm_logits[real], logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(out.mlm_targets[real], labelled)
        assert mlm_loss(out.mlm_logits, out.mlm_targets).item() == pytest.approx(mlm_loss(logits, labelled).item(),
                                                                                 rel=1e-5)
        # [B, L] labels instead of positions: the same, computed in forward.
        again = tiny(inputs["images"], inputs["input_ids"], inputs["attention_mask"], inputs["mlm_input_ids"],
                     inputs["mlm_labels"])
        torch.testing.assert_close(again.mlm_logits, out.mlm_logits)


def test_patch_dropout_drops_patches_in_training_only_and_is_not_saved(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", patch_dropout=0.5), vocab_size=VOCAB)
    embeddings = model.towers.vision_model.embeddings
    lengths = []
    hook = embeddings.register_forward_hook(lambda module, inputs, output: lengths.append(output.shape[1]))
    images = batch(2)["images"]
    model.train()
    first, second = model.encode_images(images), model.encode_images(images)
    model.eval()
    with torch.no_grad():
        whole, again = model.encode_images(images), model.encode_images(images)
    hook.remove()
    # The hook registered last sees what the tower gets: 64 patches + class token, half the patches in training.
    assert lengths == [33, 33, 65, 65] and model.kept_patches(64) == 32
    assert not torch.allclose(first, second)  # a different random subset each pass
    assert torch.equal(whole, again)
    model.set_patch_dropout(0.0)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images(images), whole)
    model.set_patch_dropout(0.5)
    model.save(tmp_path / "saved")
    from transformers import AutoModel

    plain = AutoModel.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.get_image_features(pixel_values=model.pixel_values(images)).pooler_output,
                                   whole, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"model.patch_dropout must be in \[0, 1\)"):
        ModelConfig(patch_dropout=1.0)


def test_auto_attention_is_eager_for_16_bit_on_cpus_and_sdpa_elsewhere():
    assert resolve_attention("auto", precision="bf16", cuda=False) == "eager"
    assert resolve_attention("auto", precision="fp16", cuda=False) == "eager"
    assert resolve_attention("auto", precision="fp32", cuda=False) == "sdpa"
    assert resolve_attention("auto", precision="bf16", cuda=True) == "sdpa"
    assert resolve_attention("flash_attention_2", precision="bf16", cuda=False) == "flash_attention_2"
    built = build_model(ModelConfig(preset="tiny"), vocab_size=VOCAB)  # outside training: as for fp32
    assert built.towers.config.vision_config._attn_implementation == "sdpa"


def test_eager_and_sdpa_attention_compute_the_same_model():
    # model.attention=auto swaps the implementation by device and precision; the weights mean the same either way.
    inputs = batch(4, masked=3)
    losses, grads = [], []
    for attention in ("eager", "sdpa"):
        torch.manual_seed(0)
        objective = PretrainingObjective(build_model(ModelConfig(preset="tiny", attention=attention), vocab_size=VOCAB),
                                         LossConfig())
        out = objective(**inputs)
        out.total.backward()
        losses.append(out.total.detach())
        grads.append(torch.cat([p.grad.flatten() for p in objective.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
