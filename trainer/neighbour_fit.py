"""The labelled-neighbour index a model ships (models/neighbours.py), built from its training split.

Training builds it from the training split only, so validation posts are scored against an
index that never saw them, as live posts will be, and the review cut set on validation holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from models.classifier import MultimodalHead, MultimodalModel
from models.neighbours import NeighbourIndex
from trainer.features import LiveFeatures


@torch.no_grad()
def pooled_features(features: LiveFeatures, idx: Sequence[int], batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """([N, text_dim + image_dim] float32 pooled features as the model serves them
    (MultimodalHead.probe_inputs), [N] image-present mask) of posts `idx`."""
    idx = list(idx)
    if not idx:
        raise ValueError("no posts to take pooled features of")
    rows = [
        MultimodalHead.probe_inputs(*features.batch(idx[start : start + batch_size])).cpu().numpy()
        for start in range(0, len(idx), batch_size)
    ]
    return np.concatenate(rows), features.present[idx].cpu().numpy().astype(bool)


def build_index(
    model: MultimodalModel, pooled: np.ndarray, present: np.ndarray, labels: Mapping[str, Tensor]
) -> NeighbourIndex:
    """The index of the posts whose `pooled_features` are (`pooled`, `present`) and whose
    labels are `labels` (task -> [N], the same posts in the same order)."""
    tasks = model.config.tasks
    return NeighbourIndex.build(
        pooled,
        present,
        {t: labels[t].cpu().numpy() for t in tasks},
        {t: len(names) for t, names in tasks.items()},
        text_dim=model.text_encoder.dim,
    )
