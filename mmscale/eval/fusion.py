"""A fusion model's own validation metrics, counted batch by batch during the embedding pass.

`itm_accuracy`: each pair and one hard negative, the caption of the same batch most similar to the image
contrastively (never an identical caption, nor with `label_groups` one of the same `.cls` label, as training draws
them under loss.itm_label_groups: models.heads.same_meaning), classified by the ITM head (P(match) > 0.5 is
"match").
`mlm_accuracy`: BERT's random 15% masking of each caption from a generator seeded with the caption (so the
result does not depend on the batching or the number of ranks), predicted with the captions attending to their
images. Every batch, a rank's placeholder batch included, runs the same forward calls, so ranks stay in lockstep
under ZeRO-3; only real batches are counted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmscale.data.text import MaskingSpec
from mmscale.eval.mlm import mask_each_caption, masked_token_counts
from mmscale.eval.shared import all_reduce_sum
from mmscale.models.heads import same_meaning


class FusionValidation:
    """Counts of ITM and (with an MLM head and a [MASK] token) image-conditioned MLM over one evaluation."""

    def __init__(self, model, tokenizer, *, label_groups: bool = False):
        self.model = model
        self.label_groups = label_groups
        self.masking = None
        if model.mlm_head is not None and tokenizer.mask_token_id is not None:
            self.masking = MaskingSpec(mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
                                       vocab_size=len(tokenizer),
                                       special_ids=tuple(sorted(set(tokenizer.all_special_ids))))
        self.counts = [0.0, 0.0, 0.0, 0.0]  # ITM pairs, ITM right, masked tokens, MLM right

    def add_batch(self, inputs: dict, *, image_tokens: torch.Tensor, image_features: torch.Tensor,
                  text_features: torch.Tensor, captions: torch.Tensor, counted: bool) -> None:
        """Score one batch (`captions`: its caption groups, equal for identical captions); `counted=False` for a
        placeholder batch, which runs the same forward calls and counts nothing."""
        pairs, right = self._itm(inputs, image_tokens, image_features, text_features)
        masked = mlm_right = 0
        if self.masking is not None:
            ids, labels = mask_each_caption(inputs["input_ids"], inputs["attention_mask"], seeds=captions.tolist(),
                                            spec=self.masking)
            batch = {"mlm_input_ids": ids, "mlm_labels": labels, "attention_mask": inputs["attention_mask"]}
            masked, mlm_right = masked_token_counts(self.model, batch, images=inputs["images"].to(image_tokens.device),
                                                    device=image_tokens.device)
        if counted:
            for slot, value in enumerate((pairs, right, masked, mlm_right)):
                self.counts[slot] += value

    def _itm(self, inputs: dict, tokens: torch.Tensor, image_features: torch.Tensor,
             text_features: torch.Tensor) -> tuple[int, int]:
        """(pairs scored, pairs classified right): the batch's positives and, per image, its hardest caption."""
        device = tokens.device
        ids, mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
        labels = inputs.get("labels") if self.label_groups else None
        same = same_meaning(ids, None if labels is None else labels.to(device))  # as training draws negatives
        similarity = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T
        negative = similarity.masked_fill(same, float("-inf")).argmax(dim=1)
        has_negative = ~same.all(dim=1)
        rows = has_negative.nonzero().squeeze(1)
        logits = self.model.itm_logits(torch.cat([tokens, tokens[rows]]), torch.cat([ids, ids[negative[rows]]]),
                                       torch.cat([mask, mask[negative[rows]]]))
        match = logits.float().softmax(dim=-1)[:, 1] > 0.5
        right = int(match[:len(ids)].sum()) + int((~match[len(ids):]).sum())
        return len(match), right

    def metrics(self, device: torch.device) -> dict[str, float]:
        """`itm_accuracy` and `mlm_accuracy` over every rank's batches (a collective)."""
        pairs, right, masked, mlm_right = all_reduce_sum(self.counts, device)
        metrics = {"itm_accuracy": right / pairs if pairs else float("nan")}
        if self.masking is not None:
            metrics["mlm_accuracy"] = mlm_right / masked if masked else float("nan")
        return metrics
