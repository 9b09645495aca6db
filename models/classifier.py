"""The jointly trained multimodal classifier (task heads + ITC projections + ITM head).

`MultimodalHead` works on encoder outputs, so training can feed it cached features of
frozen encoders; `MultimodalModel` adds the encoders for end-to-end use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ModelConfig
from models.encoders import EncodedSequence, FrozenStaysEval, ImageEncoder, TextEncoder
from models.fusion import ConcatFusion, CrossAttentionFusion
from models.neighbours import NeighbourIndex

ITC_INIT_TEMPERATURE = 0.07
# CLIP clamps the logit scale at 100 (temperature 0.01); the floor keeps it from collapsing.
ITC_TEMPERATURE_RANGE = (0.01, 1.0)


@dataclass
class ClassifierOutput:
    """task_logits: task -> [B, C]; text_embed / image_embed: [B, E], L2-normalised;
    itm_logits: [B], match logit of each actual pair (meaningless where no image);
    image_present: [B] bool; logit_scale: scalar, 1 / ITC temperature; pooled: [B, text_dim +
    image_dim] float32, what the linear probes read (`MultimodalHead.probe_inputs`), filled by
    every forward (None only where a caller builds an output by hand)."""

    task_logits: dict[str, Tensor]
    text_embed: Tensor
    image_embed: Tensor
    itm_logits: Tensor
    image_present: Tensor
    logit_scale: Tensor
    # Projected sequences the fusion read, kept so negative pairs reuse them.
    text_seq: Tensor
    text_mask: Tensor
    image_seq: Tensor
    image_mask: Tensor
    pooled: Tensor | None = None
    # space -> task -> [B, C] neighbour label shares, when the served head already looked them
    # up for its vote (models/neighbours.py); the Predictor reuses them for routing.
    neighbour_shares: dict[str, dict[str, Tensor]] | None = None


class MultimodalHead(FrozenStaysEval):
    def __init__(self, config: ModelConfig, text_dim: int, image_dim: int) -> None:
        super().__init__()
        self.config = config
        d = config.fusion_dim
        self.text_seq = nn.Linear(text_dim, d)
        self.image_seq = nn.Linear(image_dim, d)
        self.text_itc = nn.Linear(text_dim, config.embed_dim)
        self.image_itc = nn.Linear(image_dim, config.embed_dim)
        # Stand-ins for a missing image (text-only posts, modality dropout).
        self.missing_image_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.fusion: nn.Module
        if config.fusion == "cross_attention":
            self.fusion = CrossAttentionFusion(d, config.fusion_heads, config.fusion_layers, config.dropout)
        else:
            self.fusion = ConcatFusion(d, config.dropout)
        self.heads = nn.ModuleDict(
            {
                task: nn.Sequential(nn.Dropout(config.dropout), nn.Linear(d + 2 * config.embed_dim, len(labels)))
                for task, labels in config.tasks.items()
            }
        )
        # Linear probes over [text pooled, image pooled * present] (config.probe_tasks): on small
        # data a strongly regularised linear model beats the fusion head (trainer.probe); served
        # instead of the head or blended with it (config.probe_mode).
        self.probes = nn.ModuleDict(
            {task: nn.Linear(text_dim + image_dim, len(config.tasks[task])) for task in config.probe_tasks}
        )
        self.itm_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / ITC_INIT_TEMPERATURE)))

    def clamped_logit_scale(self) -> Tensor:
        low, high = ITC_TEMPERATURE_RANGE
        return self.logit_scale.clamp(math.log(1 / high), math.log(1 / low)).exp()

    def image_sequence(self, image: EncodedSequence, present: Tensor) -> tuple[Tensor, Tensor]:
        """Project image tokens; rows without an image get the learned missing token only."""
        seq = self.image_seq(image.tokens)
        mask = image.mask & present.unsqueeze(1)
        missing = self.missing_image_token.to(seq.dtype).expand(seq.shape[0], 1, -1)
        seq = torch.cat([missing, seq], dim=1)
        mask = torch.cat([~present.unsqueeze(1), mask], dim=1)
        return seq, mask

    def itm_logits(self, fused: Tensor) -> Tensor:
        return self.itm_head(fused).squeeze(-1)

    def pair_itm_logits(self, out: ClassifierOutput, text_idx: Tensor, image_idx: Tensor) -> Tensor:
        """ITM logits for arbitrary (text_idx[k], image_idx[k]) pairs of a batch, e.g.
        negatives; reuses the batch's projections, so only the fusion runs again."""
        fused = self.fusion(
            out.text_seq[text_idx], out.text_mask[text_idx], out.image_seq[image_idx], out.image_mask[image_idx]
        )
        return self.itm_logits(fused)

    @staticmethod
    def probe_inputs(text: EncodedSequence, image: EncodedSequence, image_present: Tensor) -> Tensor:
        """[text pooled, image pooled] in float32, image zeroed for text-only posts (their image
        features are whatever the encoder made of a blank input): what the probes read."""
        image_pooled = torch.where(image_present.unsqueeze(1), image.pooled.float(), 0.0)
        return torch.cat([text.pooled.float(), image_pooled], dim=-1)

    def probe_logits(self, pooled: Tensor) -> dict[str, Tensor]:
        """Logits of the probe tasks from `probe_inputs`. In float32 even under autocast: the
        folded standardisation makes weights and bias large and cancelling, too much for bf16."""
        if not len(self.probes):
            return {}
        with torch.autocast(pooled.device.type, enabled=False):
            return {task: probe(pooled) for task, probe in self.probes.items()}

    def blend(self, task: str, head_logits: Tensor, probe_logits: Tensor) -> Tensor:
        """log(0.5 softmax(head / T_head) + 0.5 softmax(probe)), in float32: log-probabilities
        of the mixture, so softmax of them is the mixture and calibration on top works as on
        any logits. logaddexp of the log-softmaxes keeps it finite where a probability underflows."""
        with torch.autocast(probe_logits.device.type, enabled=False):
            head = F.log_softmax(head_logits.float() / self.config.head_temperatures[task], dim=-1)
            probe = F.log_softmax(probe_logits.float(), dim=-1)
            return torch.logaddexp(head, probe) - math.log(2.0)

    def task_logits(self, features: Tensor, pooled: Tensor) -> dict[str, Tensor]:
        """Per task: the fusion head's logits, or for a probe task the probe's ("replace") or the
        blend of both ("blend"), as config.probe_mode says."""
        probed = self.probe_logits(pooled)
        out = {}
        for task, head in self.heads.items():
            if task not in probed:
                out[task] = head(features)
            elif self.config.probe_mode == "blend":
                out[task] = self.blend(task, head(features), probed[task])
            else:
                out[task] = probed[task]
        return out

    def forward(self, text: EncodedSequence, image: EncodedSequence, image_present: Tensor) -> ClassifierOutput:
        text_seq = self.text_seq(text.tokens)
        image_seq, image_mask = self.image_sequence(image, image_present)
        fused = self.fusion(text_seq, text.mask, image_seq, image_mask)
        text_vec = self.text_itc(text.pooled)
        image_vec = self.image_itc(image.pooled)
        # Task heads also read the unimodal ITC projections (zero without an image): a
        # direct path like a linear probe's, and the place where ITC shapes the task.
        features = torch.cat([fused, text_vec, image_vec * image_present.unsqueeze(1).to(image_vec.dtype)], dim=-1)
        with torch.autocast(text.pooled.device.type, enabled=False):
            pooled = self.probe_inputs(text, image, image_present)
        return ClassifierOutput(
            task_logits=self.task_logits(features, pooled),
            text_embed=F.normalize(text_vec, dim=-1),
            image_embed=F.normalize(image_vec, dim=-1),
            itm_logits=self.itm_logits(fused),
            image_present=image_present,
            logit_scale=self.clamped_logit_scale(),
            text_seq=text_seq,
            text_mask=text.mask,
            image_seq=image_seq,
            image_mask=image_mask,
            pooled=pooled,
        )


class MultimodalModel(FrozenStaysEval):
    """Encoders + head. Inputs are tokenised text and preprocessed pixels. `train()` leaves
    every frozen part (frozen encoder blocks, and the head but the ITM head while only that
    trains) in eval mode: BatchNorm statistics and dropout move only where weights train."""

    def __init__(self, config: ModelConfig, text: TextEncoder, image: ImageEncoder) -> None:
        super().__init__()
        self.config = config
        self.text_encoder = text
        self.image_encoder = image
        self.head = MultimodalHead(config, text.dim, image.dim)
        # The labelled training posts review routing compares each post with (models/neighbours.py):
        # set by training, stored next to the weights by models/registry.py, read by the Predictor.
        self.neighbours: NeighbourIndex | None = None
        self.apply_freezing()

    def apply_freezing(self) -> None:
        self.text_encoder.set_trainable(self.config.text_trainable_layers)
        self.image_encoder.set_trainable(self.config.image_trainable_blocks)

    def encode(
        self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor
    ) -> tuple[EncodedSequence, EncodedSequence]:
        return self.text_encoder(input_ids, attention_mask), self.image_encoder(pixel_values)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, image_present: Tensor
    ) -> ClassifierOutput:
        text, image = self.encode(input_ids, attention_mask, pixel_values)
        return self.served_head(text, image, image_present)

    def served_head(self, text: EncodedSequence, image: EncodedSequence, image_present: Tensor) -> ClassifierOutput:
        """The head's outputs as served: with the labelled neighbours' vote mixed into the task
        logits when the config asks for it and training has given the model its index (during
        training there is none, so losses see the head alone)."""
        out = self.head(text, image, image_present)
        if self.neighbours is not None and self.config.neighbour_vote > 0 and out.pooled is not None:
            out.neighbour_shares = self.neighbours.label_shares_tensors(out.pooled, image_present)
            out.task_logits = self.neighbours.vote(out.task_logits, out.neighbour_shares, self.config.neighbour_vote)
        return out
