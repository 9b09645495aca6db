"""Labelled neighbours: do the training posts most like this one carry the label the model gives?

Uncertainty finds the posts near the decision threshold, where the model is wrong about half
the time, but not the confident mistakes, and on CM-Off it caps review at about 1.5x the
errors a random sample catches. A post whose nearest labelled training posts (by text, and
by image) were labelled otherwise than the model now decides is a likely mistake whatever
the model's confidence: memes repeat their templates and captions, and a neighbourhood's
labels carry what the head failed to learn. Margin uncertainty plus this disagreement raised
the lift at a 10% review budget from 1.29 to 1.69 / 1.64 (hate / sarcasm) on CM-Off
(BENCHMARKS.md, "Routing policies compared").

The index keeps, per space (the pooled text features, and the pooled image features of posts
with an image), the training posts' standardised unit vectors and labels; a query's k nearest
labelled posts by cosine similarity vote with weight max(similarity, 0). No I/O
(models/registry.py stores it next to the weights).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from models.losses import IGNORE_INDEX

SPACES = ("text", "image")
K = 10
# Serving cost is a [batch, rows] similarity per space; beyond this many training posts the
# index keeps a random sample (20k rows x 1,664 dims is 67 MB on disk in float16).
MAX_ROWS = 20_000

FloatArray = npt.NDArray[np.float64]


@dataclass
class SpaceIndex:
    mean: np.ndarray  # [D] float32
    scale: np.ndarray  # [D] float32, > 0
    vectors: np.ndarray  # [M, D] float32 unit rows
    labels: dict[str, np.ndarray]  # task -> [M] int64, IGNORE_INDEX where not labelled

    def unit(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, dtype=np.float32) - self.mean) / self.scale
        return np.asarray(z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12), dtype=np.float32)


def _space(x: np.ndarray, labels: Mapping[str, np.ndarray]) -> SpaceIndex:
    x = np.asarray(x, dtype=np.float32)
    mean = x.mean(0) if len(x) else np.zeros(x.shape[1], np.float32)
    scale = x.std(0) if len(x) else np.ones(x.shape[1], np.float32)
    space = SpaceIndex(mean, np.where(scale > 1e-6, scale, 1.0).astype(np.float32), x, {})
    space.vectors = space.unit(x)
    space.labels = {t: np.asarray(y, dtype=np.int64) for t, y in labels.items()}
    return space


@dataclass
class NeighbourIndex:
    """`text_dim`: the pooled features' first `text_dim` columns are text, the rest image
    (MultimodalHead.probe_inputs). `n_labels`: task -> number of classes."""

    text_dim: int
    n_labels: dict[str, int]
    spaces: dict[str, SpaceIndex]
    k: int = K
    _tensors: dict[tuple[str, str], Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def build(
        cls,
        pooled: np.ndarray,
        present: np.ndarray,
        labels: Mapping[str, np.ndarray],
        n_labels: Mapping[str, int],
        text_dim: int,
        k: int = K,
        max_rows: int = MAX_ROWS,
        seed: int = 0,
    ) -> NeighbourIndex:
        """From the training posts' pooled features [N, D], image-present mask [N] and labels
        (task -> [N], IGNORE_INDEX where unknown). Rows labelled for no task are left out."""
        pooled = np.asarray(pooled, dtype=np.float32)
        present = np.asarray(present, dtype=bool)
        if pooled.ndim != 2 or not 0 < text_dim < pooled.shape[1] or len(present) != len(pooled):
            raise ValueError(f"pooled features {pooled.shape} do not fit text_dim {text_dim} / {len(present)} posts")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        labels = {t: np.asarray(y, dtype=np.int64) for t, y in labels.items()}
        keep = np.flatnonzero(np.any([y != IGNORE_INDEX for y in labels.values()], axis=0))
        if len(keep) > max_rows:
            keep = np.sort(np.random.default_rng(seed).choice(keep, size=max_rows, replace=False))
        rows = {"text": keep, "image": keep[present[keep]]}
        cols = {"text": slice(0, text_dim), "image": slice(text_dim, None)}
        spaces = {
            name: _space(pooled[idx][:, cols[name]], {t: y[idx] for t, y in labels.items()})
            for name, idx in rows.items()
            if len(idx)
        }
        return cls(text_dim, {t: int(n) for t, n in n_labels.items() if t in labels}, spaces, k)

    def __len__(self) -> int:
        return len(self.spaces["text"].vectors) if "text" in self.spaces else 0

    def label_shares(
        self, pooled: np.ndarray | torch.Tensor, present: np.ndarray | torch.Tensor
    ) -> dict[str, dict[str, np.ndarray]]:
        """space -> task -> [N, C]: the similarity-weighted share of each class among each
        query's k nearest posts labelled for the task; NaN rows where the query lacks the space
        (no image) or the index has no labelled post. Computed with torch on the device the
        `pooled` tensor lives on (a GPU worker's lookup stays on the GPU; on a CPU it runs on
        torch's threads, where numpy's BLAS would start its own and contend with them)."""
        return shares_as_numpy(self.label_shares_tensors(pooled, present))

    def label_shares_tensors(
        self, pooled: np.ndarray | torch.Tensor, present: np.ndarray | torch.Tensor
    ) -> dict[str, dict[str, torch.Tensor]]:
        """`label_shares` as float64 tensors on `pooled`'s device."""
        x = torch.as_tensor(pooled).float()
        device = x.device
        has_image = torch.as_tensor(present, device=device).bool()
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name in self.spaces:
            vectors, mean, scale, labels = self._on(name, device)
            q = x[:, : self.text_dim] if name == "text" else x[:, self.text_dim :]
            has = torch.ones(len(x), dtype=torch.bool, device=device) if name == "text" else has_image
            z = (q - mean) / scale
            sims = (z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ vectors.T  # [N, M]
            out[name] = {}
            for task, n_classes in self.n_labels.items():
                shares = torch.full((len(x), n_classes), math.nan, dtype=torch.float64, device=device)
                y = labels[task]
                labelled = y != IGNORE_INDEX
                n_labelled = int(labelled.sum())
                if n_labelled and bool(has.any()):
                    top, nearest = sims[has].masked_fill(~labelled, -math.inf).topk(min(self.k, n_labelled), dim=1)
                    weight = top.clamp_min(0.0).double() + 1e-9
                    votes = y[nearest]
                    tally = torch.stack([(weight * (votes == c)).sum(1) for c in range(n_classes)], dim=1)
                    shares[has] = tally / weight.sum(1, keepdim=True)
                out[name][task] = shares
        return out

    @staticmethod
    def vote(
        task_logits: Mapping[str, torch.Tensor], shares: Mapping[str, Mapping[str, torch.Tensor]], weight: float
    ) -> dict[str, torch.Tensor]:
        """The neighbours' vote mixed into each task's probabilities: log((1 - weight) *
        softmax(logits) + weight * vote), the vote being the class shares (`label_shares_tensors`)
        averaged over the post's spaces. A task or post without neighbours keeps its logits.
        Float32 log-probabilities, so calibration on top works as on any logits."""
        out = dict(task_logits)
        for task, logits in task_logits.items():
            per_space = [by_task[task] for by_task in shares.values() if task in by_task]
            if not per_space:
                continue
            stacked = torch.stack(per_space)  # [S, N, C]
            known = ~torch.isnan(stacked[..., 0])  # [S, N]
            votes = torch.nan_to_num(stacked).sum(0) / known.sum(0).clamp_min(1).unsqueeze(1)
            with torch.autocast(logits.device.type, enabled=False):
                mixed = (1 - weight) * torch.softmax(logits.float(), -1) + weight * votes.float()
                voted = torch.log(mixed.clamp_min(1e-12))
            out[task] = torch.where(known.any(0).unsqueeze(1), voted, logits.float())
        return out

    def _on(
        self, name: str, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Space `name`'s vectors, standardisation and labels as tensors on `device` (cached)."""
        key = (name, str(device))
        if key not in self._tensors:
            space = self.spaces[name]
            self._tensors[key] = (
                torch.as_tensor(space.vectors, device=device),
                torch.as_tensor(space.mean, device=device),
                torch.as_tensor(space.scale, device=device),
                {t: torch.as_tensor(y, device=device) for t, y in space.labels.items()},
            )
        return self._tensors[key]

    # -- storage: flat tensors + string metadata (safetensors' format)

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        arrays: dict[str, np.ndarray] = {}
        for name, space in self.spaces.items():
            arrays[f"{name}/mean"] = space.mean
            arrays[f"{name}/scale"] = space.scale
            arrays[f"{name}/vectors"] = space.vectors.astype(np.float16)  # unit rows: half precision is plenty
            for task, y in space.labels.items():
                arrays[f"{name}/labels/{task}"] = y
        meta = {"text_dim": str(self.text_dim), "k": str(self.k), "n_labels": json.dumps(self.n_labels)}
        return arrays, meta

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> NeighbourIndex:
        try:
            n_labels = {str(t): int(n) for t, n in json.loads(meta["n_labels"]).items()}
            spaces = {
                name: SpaceIndex(
                    np.asarray(arrays[f"{name}/mean"], np.float32),
                    np.asarray(arrays[f"{name}/scale"], np.float32),
                    np.asarray(arrays[f"{name}/vectors"], np.float32),
                    {t: np.asarray(arrays[f"{name}/labels/{t}"], np.int64) for t in n_labels},
                )
                for name in SPACES
                if f"{name}/vectors" in arrays
            }
            index = cls(int(meta["text_dim"]), n_labels, spaces, int(meta["k"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"malformed neighbour index: {exc!r}") from exc
        for name, space in spaces.items():
            rows = len(space.vectors)
            if any(len(y) != rows for y in space.labels.values()) or space.mean.shape != space.vectors.shape[1:]:
                raise ValueError(f"malformed neighbour index: space {name!r} has inconsistent shapes")
        return index


def shares_as_numpy(shares: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, np.ndarray]]:
    """`label_shares_tensors`' output as `label_shares`' (numpy, on the CPU)."""
    return {space: {task: v.cpu().numpy() for task, v in by_task.items()} for space, by_task in shares.items()}


def disagreement(
    shares: Mapping[str, Mapping[str, np.ndarray]], decisions: Mapping[str, np.ndarray]
) -> dict[str, FloatArray]:
    """task -> [N]: 1 - the neighbours' share of the class the model decided, averaged over
    the spaces a post has (0: every neighbour agrees, 1: none does); NaN without neighbours."""
    out: dict[str, FloatArray] = {}
    for task, decided in decisions.items():
        decided = np.asarray(decided, dtype=np.int64)
        per_space = [
            1.0 - np.take_along_axis(by_task[task], decided[:, None], 1)[:, 0]
            for by_task in shares.values()
            if task in by_task
        ]
        if not per_space:
            out[task] = np.full(len(decided), math.nan)
            continue
        stacked = np.stack(per_space)
        counts = np.sum(~np.isnan(stacked), axis=0)
        total = np.nansum(stacked, axis=0)
        out[task] = np.where(counts > 0, total / np.maximum(counts, 1), math.nan)
    return out
