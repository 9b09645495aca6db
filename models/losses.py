"""Training losses, each a small function returning `{name: value}` (open_clip style).

The training step sums them with weights (the paper: 0.8 task, 0.1 ITC, 0.1 ITM).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
NegativeSampling = Literal["hard", "random"]
DEFAULT_LOSS_WEIGHTS = {"task_loss": 0.8, "itc_loss": 0.1, "itm_loss": 0.1}


def task_loss(
    logits: Mapping[str, Tensor],
    labels: Mapping[str, Tensor],
    class_weights: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Class-weighted cross-entropy per task, ignoring rows labelled IGNORE_INDEX.

    A dataset may label only one task: a task with no labelled row in the batch contributes
    nothing (rather than NaN). `task_loss` is the mean over the tasks that have labels.
    """
    out: dict[str, Tensor] = {}
    present: list[Tensor] = []
    for task, task_logits in logits.items():
        y = labels[task]
        if not bool((y != IGNORE_INDEX).any()):
            continue
        weight = None if class_weights is None else class_weights.get(task)
        if weight is not None:
            weight = weight.to(device=task_logits.device, dtype=task_logits.dtype)
        loss = F.cross_entropy(task_logits, y, weight=weight, ignore_index=IGNORE_INDEX)
        out[f"{task}_loss"] = loss
        present.append(loss)
    any_logits = next(iter(logits.values()))
    out["task_loss"] = torch.stack(present).mean() if present else any_logits.sum() * 0.0
    return out


def itc_loss(
    text_embed: Tensor, image_embed: Tensor, logit_scale: Tensor, valid: Tensor | None = None
) -> dict[str, Tensor]:
    """Symmetric in-batch InfoNCE over the rows that have an image (CLIP).

    Embeddings must be L2-normalised; `logit_scale` is 1 / temperature.
    """
    if valid is not None:
        text_embed, image_embed = text_embed[valid], image_embed[valid]
    n = text_embed.shape[0]
    if n < 2:
        return {"itc_loss": text_embed.sum() * 0.0 + logit_scale * 0.0}
    logits = logit_scale * text_embed @ image_embed.t()
    target = torch.arange(n, device=logits.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    return {"itc_loss": loss}


def random_negatives(n: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> Tensor:
    """A random partner j != i for every i (the paper's in-batch text swap)."""
    if n < 2:
        raise ValueError("negatives need at least two pairs")
    shift = torch.randint(1, n, (n,), generator=generator).to(device)
    return (torch.arange(n, device=device) + shift) % n


def hard_negatives(
    similarity: Tensor, generator: torch.Generator | None = None, exclude: Tensor | None = None
) -> Tensor:
    """For each row i, sample a column j != i with probability softmax(similarity[i]) (ALBEF).

    `exclude` ([B, B] bool) masks further pairs that are not real negatives, e.g. two
    posts carrying the same image. Rows with nothing left fall back to a random j != i.
    """
    n = similarity.shape[0]
    if n < 2:
        raise ValueError("negatives need at least two pairs")
    blocked = torch.eye(n, dtype=torch.bool, device=similarity.device)
    if exclude is not None:
        blocked = blocked | exclude
    weights = torch.softmax(similarity.detach().float().masked_fill(blocked, float("-inf")), dim=1)
    empty = blocked.all(dim=1)
    if bool(empty.any()):
        weights = torch.where(
            empty.unsqueeze(1),
            (~torch.eye(n, dtype=torch.bool, device=weights.device)).float(),
            weights,
        )
    weights = torch.nan_to_num(weights, nan=0.0)
    return torch.multinomial(weights.cpu(), 1, generator=generator).squeeze(1).to(similarity.device)


def itm_loss(positive_logits: Tensor, negative_logits: Tensor) -> dict[str, Tensor]:
    """Binary cross-entropy: actual pairs are matches (1), sampled pairs are not (0)."""
    logits = torch.cat([positive_logits, negative_logits])
    target = torch.cat([torch.ones_like(positive_logits), torch.zeros_like(negative_logits)])
    return {"itm_loss": F.binary_cross_entropy_with_logits(logits, target)}


def weighted_total(losses: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """Sum of `weights[name] * losses[name]` over the weighted names that are present."""
    terms = [weights[name] * losses[name] for name in weights if name in losses and weights[name]]
    if not terms:
        raise ValueError(f"no weighted loss among {sorted(losses)}")
    return torch.stack(terms).sum()
