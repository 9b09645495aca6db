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
    model: MultimodalModel, features: LiveFeatures, labels: Mapping[str, Tensor], train_idx: Sequence[int]
) -> NeighbourIndex:
    """The index of the training posts `train_idx` (`labels`: task -> [all posts])."""
    x, present = pooled_features(features, train_idx)
    tasks = model.config.tasks
    return NeighbourIndex.build(
        x,
        present,
        {t: labels[t][list(train_idx)].cpu().numpy() for t in tasks},
        {t: len(names) for t, names in tasks.items()},
        text_dim=model.text_encoder.dim,
    )


def label_shares(index: NeighbourIndex, features: LiveFeatures, idx: Sequence[int]) -> dict[str, dict[str, np.ndarray]]:
    """NeighbourIndex.label_shares of posts `idx`."""
    x, present = pooled_features(features, idx)
    return index.label_shares(x, present)
