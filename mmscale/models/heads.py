"""Heads mmscale adds beside the `transformers` towers: BERT's masked-LM head, the VQA answer classifier, and the
hard negatives that image-text matching (ITM) is trained on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN


class MaskedLMHead(nn.Module):
    """BERT's MLM head (dense, activation, LayerNorm, decoder) with the decoder weight tied to the
    text tower's word embeddings. The tied weight is registered on `decoder`, so under ZeRO-3 it is
    gathered when the decoder runs, like any parameter of the module that uses it."""

    def __init__(self, *, width: int, vocab_size: int, activation: str, layer_norm_eps: float,
                 word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.activation = ACT2FN[activation]
        self.norm = nn.LayerNorm(width, eps=layer_norm_eps)
        self.decoder = nn.Linear(width, vocab_size)
        self.decoder.weight = word_embeddings.weight
        self.reset_parameters()

    def reset_parameters(self):
        """BERT's initialization of the head's own weights (the tied decoder weight is the embedding's)."""
        nn.init.normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)
        self.norm.reset_parameters()
        nn.init.zeros_(self.decoder.bias)

    @classmethod
    def for_text_tower(cls, text_model: PreTrainedModel) -> MaskedLMHead:
        """A new head that fits `text_model` (any BERT-style encoder config)."""
        config = text_model.config
        return cls(width=config.hidden_size, vocab_size=config.vocab_size,
                   activation=getattr(config, "hidden_act", "gelu"),
                   layer_norm_eps=getattr(config, "layer_norm_eps", 1e-12),
                   word_embeddings=text_model.get_input_embeddings())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.activation(self.dense(hidden_states))))




class VqaHead(nn.Module):
    """The answer classifier of VQA fine-tuning over a fixed answer list: ViLT's head (arXiv:2102.03334, and the
    bottom-up VQA models before it) on the fused first token: dense to twice the width, LayerNorm, GELU, then one
    logit per answer, trained with binary cross-entropy against soft scores."""

    def __init__(self, *, width: int, answers: int):
        super().__init__()
        self.dense = nn.Linear(width, 2 * width)
        self.norm = nn.LayerNorm(2 * width)
        self.activation = nn.GELU()
        self.out = nn.Linear(2 * width, answers)
        self.reset_parameters()

    @property
    def answers(self) -> int:
        return self.out.out_features

    def reset_parameters(self):
        """BERT's initialization (normal 0.02, zero biases), as ViLT's head is initialized."""
        for linear in (self.dense, self.out):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        self.norm.reset_parameters()

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        return self.out(self.activation(self.norm(self.dense(first_token))))


@dataclass
class HardNegatives:
    """For each row of a batch, the row whose caption is its image's hard negative and the row whose image is
    its caption's hard negative."""

    text_index: torch.Tensor
    """[B] int64: the caption paired with image i as a negative."""
    image_index: torch.Tensor
    """[B] int64: the image paired with caption i as a negative."""
    text_valid: torch.Tensor
    """[B] float 0/1: 0 where image i has no candidate (every caption of the batch is its own), so the pair it
    got must not count as a negative."""
    image_valid: torch.Tensor
    """[B] float 0/1: the same for caption i."""


@dataclass
class NegativePool:
    """The pairs hard negatives are drawn from, when not the batch's own rows: under loss.itm_negatives=global,
    every rank's rows of the micro-batch (this rank's among them, so the pair itself is excluded as an identical
    caption). Features need no gradient; captions have the batch's length."""

    image_features: torch.Tensor
    """[N, D] contrastive image features (not normalized)."""
    text_features: torch.Tensor
    """[N, D] contrastive text features (not normalized)."""
    input_ids: torch.Tensor
    """[N, L] captions."""
    groups: torch.Tensor | None = None
    """[N] labels (-1: none), or None."""


def same_meaning(input_ids: torch.Tensor, groups: torch.Tensor | None = None, *,
                 pool: NegativePool | None = None) -> torch.Tensor:
    """[B, N] True where a row's pair and a pair of `pool` (default: the same rows, N = B) cannot be each other's
    negatives: identical captions (identical token ids, padding included), and the same group where `groups`
    ([B] int, -1 for none) gives one. BLIP excludes pairs of the same image id (`idx`, the 5 captions of a COCO
    image) the same way; with loss.itm_label_groups mmscale's group is the sample's `.cls` label: where captions
    are templated from it, "the character 7" and "a printed 7" describe each other's images, and as the most
    similar caption they would be drawn as negatives whenever both are in a batch (labelled false: with 33
    characters, in most batches of 64)."""
    pool_ids, pool_groups = (input_ids, groups) if pool is None else (pool.input_ids, pool.groups)
    same = (input_ids[:, None, :] == pool_ids[None, :, :]).all(dim=-1)  # the pair itself included
    if groups is not None:
        same = same | ((groups[:, None] == pool_groups[None, :]) & (groups[:, None] >= 0))
    return same


@torch.no_grad()
def hard_negatives(image_features: torch.Tensor, text_features: torch.Tensor, input_ids: torch.Tensor,
                   logit_scale: torch.Tensor, *, groups: torch.Tensor | None = None,
                   pool: NegativePool | None = None) -> HardNegatives:
    """One hard negative per image and per caption, drawn with probability softmax(scale x similarity) over the
    batch's other rows (ALBEF and BLIP's ITM sampling, arXiv:2107.07651 §3.2), or over `pool`'s rows (indices
    then point into the pool), excluding the pair itself and every row whose caption means the same
    (same_meaning: an identical caption, or the same `groups` label).

    Drawn by Gumbel-max (argmax of logits + Gumbel noise), which is the same distribution as BLIP's
    `torch.multinomial` of the masked softmax, without its per-row host reads; a row with no candidate gets
    weight 0 instead of being skipped, so every rank runs the same shapes. No gradient flows."""
    if pool is None:
        pool = NegativePool(image_features, text_features, input_ids, groups)
    image = nn.functional.normalize(image_features.float(), dim=-1)
    text = nn.functional.normalize(text_features.float(), dim=-1)
    same = same_meaning(input_ids, groups, pool=pool)
    scale = logit_scale.float()
    captions_for_images = (scale * image @ nn.functional.normalize(pool.text_features.float(), dim=-1).T)
    images_for_captions = (scale * text @ nn.functional.normalize(pool.image_features.float(), dim=-1).T)
    valid = (~same).any(dim=1).float()  # a caption's candidates are the same pairs as its image's

    def draw(scores: torch.Tensor) -> torch.Tensor:
        scores = scores.masked_fill(same, float("-inf"))
        uniform = torch.rand_like(scores).clamp_(min=1e-20)
        # -inf + finite noise stays -inf; a row that is all -inf gives index 0, weighted 0 by `valid`.
        return (scores - torch.log(-torch.log(uniform))).argmax(dim=1)

    return HardNegatives(text_index=draw(captions_for_images), image_index=draw(images_for_captions),
                         text_valid=valid, image_valid=valid)
