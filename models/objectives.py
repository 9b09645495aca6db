"""One training objective: task loss + ITC + ITM on a batch of encoder outputs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.classifier import ClassifierOutput, MultimodalHead
from models.encoders import EncodedSequence
from models.losses import (
    DEFAULT_LOSS_WEIGHTS,
    NegativeSampling,
    hard_negatives,
    itc_loss,
    itm_loss,
    random_negatives,
    task_loss,
    weighted_total,
)


@dataclass
class ObjectiveConfig:
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LOSS_WEIGHTS))
    negatives: NegativeSampling = "hard"

    @property
    def uses_itc(self) -> bool:
        return self.weights.get("itc_loss", 0.0) > 0

    @property
    def uses_itm(self) -> bool:
        return self.weights.get("itm_loss", 0.0) > 0


def itm_objective(
    head: MultimodalHead,
    out: ClassifierOutput,
    negatives: NegativeSampling,
    generator: torch.Generator | None = None,
    same_content: Tensor | None = None,
    pair_target: Tensor | None = None,
) -> dict[str, Tensor]:
    """ITM over the rows with an image: each text gets a negative image and each image a
    negative text, sampled from ITC similarity (hard) or uniformly (random). `same_content`
    ([B, B], symmetric) marks pairs that would be false negatives (a repost's image).
    `pair_target` ([B]: 1 match, 0 mismatch, NaN unknown) says which rows' own pairs are
    positives: a known mismatch is a negative, an unknown pair is neither (it still lends its
    text and image to the sampled negatives). None: every own pair is a positive."""
    idx = out.image_present.nonzero().squeeze(1)
    n = len(idx)
    if n < 2:
        return {"itm_loss": out.itm_logits.sum() * 0.0}
    exclude = None if same_content is None else same_content[idx][:, idx]
    if negatives == "hard":
        sim = out.text_embed[idx] @ out.image_embed[idx].t()
        neg_image = hard_negatives(sim, generator, exclude)  # for text i
        neg_text = hard_negatives(sim.t(), generator, exclude)  # for image j
    elif exclude is not None:
        # Flat similarity: uniform over the allowed partners.
        flat = torch.zeros(n, n, device=idx.device)
        neg_image, neg_text = hard_negatives(flat, generator, exclude), hard_negatives(flat, generator, exclude)
    else:
        neg_image = random_negatives(n, generator, idx.device)
        neg_text = random_negatives(n, generator, idx.device)
    text_idx = torch.cat([idx, idx[neg_text]])
    image_idx = torch.cat([idx[neg_image], idx])
    negative_logits = head.pair_itm_logits(out, text_idx, image_idx)
    own = out.itm_logits[idx]
    if pair_target is None:
        return itm_loss(own, negative_logits)
    target = pair_target[idx]
    return itm_loss(own[target == 1], torch.cat([negative_logits, own[target == 0]]))


def compute_losses(
    head: MultimodalHead,
    text: EncodedSequence,
    image: EncodedSequence,
    image_present: Tensor,
    labels: Mapping[str, Tensor],
    objective: ObjectiveConfig,
    class_weights: Mapping[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
    same_content: Tensor | None = None,
    pair_target: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor], ClassifierOutput]:
    """Returns (weighted total, every named loss, the head's output)."""
    out = head(text, image, image_present)
    losses = task_loss(out.task_logits, labels, class_weights)
    if objective.uses_itc:
        losses.update(itc_loss(out.text_embed, out.image_embed, out.logit_scale, image_present))
    if objective.uses_itm:
        losses.update(itm_objective(head, out, objective.negatives, generator, same_content, pair_target))
    return weighted_total(losses, objective.weights), losses, out
