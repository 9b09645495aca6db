"""Model inputs for training: cached encoder outputs (frozen encoders) or live encoding.

A frozen encoder gives the same output for the same content on every epoch, fold and seed,
so its outputs are computed once and cached on disk by content hash (sha256 of the text or
of the image bytes, plus the backbone's identity). A text encoder with only its top layers
unfrozen caches the frozen layers' output the same way and runs just the top layers live,
and so does an image encoder with only its last blocks unfrozen (the feature map below
them); an encoder fine-tuned from the bottom runs live.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor

from models.classifier import MultimodalModel
from models.encoders import EncodedSequence, masked_mean
from models.ocr import OcrEngine, OcrError, TesseractOcr
from models.preprocess import ImagePreprocessor, PostText, TextPreprocessor, ocr_of
from modstream.manifest import Example
from trainer.images import ImageError, content_hash, decode_image

log = logging.getLogger(__name__)
ENCODE_BATCH = 32


@dataclass
class LoadedInputs:
    """Raw inputs of a dataset, decoded once. `images[i]` is None for text-only posts."""

    examples: list[Example]
    images: list[Image.Image | None]
    image_hashes: list[str | None]
    image_errors: Counter[str] = field(default_factory=Counter)
    # Text read from each image (None: no image, or OCR failed); None when OCR is not used.
    ocr_texts: list[str | None] | None = None

    @property
    def image_present(self) -> Tensor:
        return torch.tensor([im is not None for im in self.images], dtype=torch.bool)

    @property
    def pair_targets(self) -> Tensor:
        """Per post, whether its text and image belong together (the ITM target): 1 for data
        published as pairs (the default), 0 where a reviewer said they do not, NaN where no
        one said (a reviewed post: routed because the pair looked weak, so not assumed a match);
        `meta["itm_target"]` carries the answer (trainer/reviewed.py sets it)."""
        values = []
        for example in self.examples:
            target = example.meta.get("itm_target", True)
            values.append(math.nan if target is None else float(bool(target)))
        return torch.tensor(values, dtype=torch.float32)

    def text_of(self, i: int) -> str:
        """Post i's text for the tokenizer, carrying its OCR text when OCR is used."""
        text = self.examples[i].text
        return text if self.ocr_texts is None else PostText(text, self.ocr_texts[i])


def load_inputs(examples: Sequence[Example], on_bad_image: str = "text-only") -> LoadedInputs:
    """Decode every image; a corrupt or missing one is counted by reason and the post becomes
    text-only (or is dropped with on_bad_image="skip"), never an exception mid-epoch."""
    kept: list[Example] = []
    images: list[Image.Image | None] = []
    hashes: list[str | None] = []
    errors: Counter[str] = Counter()
    for example in examples:
        image = digest = None
        if example.image is not None:
            try:
                data = example.image.read_bytes()
                image, digest = decode_image(data), content_hash(data)
            except FileNotFoundError:
                errors["missing"] += 1
            except ImageError as exc:
                errors[exc.reason] += 1
            if image is None and on_bad_image == "skip":
                continue
        kept.append(example)
        images.append(image)
        hashes.append(digest)
    if errors:
        log.warning("images that could not be used (%s): %s", on_bad_image, dict(errors))
    return LoadedInputs(kept, images, hashes, errors)


def _text_key(text: str, max_length: int, ocr_segment: bool = False) -> str:
    # Without the OCR segment the key is unchanged, so existing caches stay valid.
    if not ocr_segment:
        return hashlib.sha256(f"{max_length}\0{text}".encode()).hexdigest()
    pair = json.dumps([str(text), ocr_of(text)])
    return hashlib.sha256(f"{max_length}\0pair\0{pair}".encode()).hexdigest()


class FeatureStore:
    """Content-addressed on-disk cache of encoder outputs: `root/<encoder key>/<hash>.safetensors`."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def _path(self, key: str, digest: str, suffix: str = ".safetensors") -> Path | None:
        return None if self.root is None else self.root / key / digest[:2] / f"{digest}{suffix}"

    def get(self, encoder_key: str, digest: str) -> Tensor | None:
        path = self._path(encoder_key, digest)
        if path is None or not path.is_file():
            return None
        return load_file(str(path))["tokens"]

    def put(self, encoder_key: str, digest: str, tokens: Tensor) -> None:
        path = self._path(encoder_key, digest)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"tokens": tokens.contiguous()}, str(tmp))
        tmp.replace(path)

    def get_text(self, engine_key: str, digest: str) -> str | None:
        """Cached OCR text of an image (by content hash), or None when not cached."""
        path = self._path(engine_key, digest, ".json")
        if path is None or not path.is_file():
            return None
        value = json.loads(path.read_text(encoding="utf-8")).get("text")
        return value if isinstance(value, str) else None

    def put_text(self, engine_key: str, digest: str, text: str) -> None:
        path = self._path(engine_key, digest, ".json")
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"text": text}, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)


def encoder_key(model: MultimodalModel, which: str) -> str:
    """Identifies an encoder's weights (and an image encoder's input size and normalisation,
    which its output depends on but its weights do not fix), so a cache never serves another
    model's features."""
    encoder = model.text_encoder if which == "text" else model.image_encoder
    h = hashlib.sha256()
    if which == "image":
        image = model.image_encoder
        h.update(f"px{image.image_size} mean{tuple(image.mean)} std{tuple(image.std)}".encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        # Hash on the CPU: weights may live on a GPU, and numpy reads host memory only.
        h.update(tensor.detach().flatten()[:64].to(device="cpu", dtype=torch.float32).numpy().tobytes())
        h.update(str(tuple(tensor.shape)).encode())
    return f"{which}-{h.hexdigest()[:16]}"


@dataclass
class TextPrefix:
    """Cached input of text layer `start`, for a text encoder whose layers `start:` train."""

    states: FrozenSequences
    start: int

    def subset(self, idx: Sequence[int]) -> TextPrefix:
        return TextPrefix(self.states.subset(idx), self.start)


@dataclass
class ImagePrefix:
    """Cached input of image unit `start` (a feature map [C, H, W] per post, kept as H*W
    tokens of C channels like FrozenSequences), for an image encoder whose units `start:` train."""

    states: FrozenSequences
    start: int
    height: int
    width: int

    def maps(self, idx: Sequence[int], device: torch.device) -> Tensor:
        """The cached maps of posts `idx` as [B, C, H, W] float32 on `device`."""
        index = torch.as_tensor(list(idx), dtype=torch.long)
        tokens = self.states.tokens[index].to(device=device, dtype=torch.float32)  # [B, H*W, C]
        return tokens.transpose(1, 2).reshape(len(index), -1, self.height, self.width)

    def subset(self, idx: Sequence[int]) -> ImagePrefix:
        return ImagePrefix(self.states.subset(idx), self.start, self.height, self.width)


@dataclass
class FrozenSequences:
    """A frozen encoder's outputs for a whole dataset, padded once: tokens [N, L, D]
    (float16 to halve memory), mask [N, L]. Batches are plain index lookups."""

    tokens: Tensor
    mask: Tensor

    @classmethod
    def stack(cls, seqs: Sequence[Tensor]) -> FrozenSequences:
        length = max(int(s.shape[0]) for s in seqs)
        tokens = torch.zeros(len(seqs), length, int(seqs[0].shape[1]), dtype=torch.float16)
        mask = torch.zeros(len(seqs), length, dtype=torch.bool)
        for i, s in enumerate(seqs):
            tokens[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = True
        return cls(tokens, mask)

    def take(self, idx: Sequence[int], device: torch.device) -> EncodedSequence:
        index = torch.as_tensor(list(idx), dtype=torch.long)
        mask = self.mask[index]
        length = int(mask.sum(1).max())  # trim padding no row in this batch needs
        tokens = self.tokens[index, :length].to(device=device, dtype=torch.float32)
        mask = mask[:, :length].to(device)
        return EncodedSequence(tokens, mask, masked_mean(tokens, mask))

    def subset(self, idx: Sequence[int]) -> FrozenSequences:
        index = torch.as_tensor(list(idx), dtype=torch.long)
        return FrozenSequences(self.tokens[index], self.mask[index])


class LiveFeatures:
    """Runs the encoders on every batch (used for any encoder that is being fine-tuned);
    a frozen side can still come from a cache via `frozen_text` / `frozen_image`."""

    def __init__(
        self,
        model: MultimodalModel,
        tokenizer: object,
        inputs: LoadedInputs,
        device: torch.device,
        frozen_text: FrozenSequences | None = None,
        frozen_image: FrozenSequences | None = None,
        text_prefix: TextPrefix | None = None,
        image_prefix: ImagePrefix | None = None,
    ) -> None:
        self.model = model
        self.inputs = inputs
        self.device = device
        self.text_pre = TextPreprocessor(tokenizer, model.config.max_text_length, model.config.ocr_segment)
        enc = model.image_encoder
        self.image_pre = ImagePreprocessor(enc.image_size, enc.mean, enc.std)
        self.frozen_text = frozen_text
        self.frozen_image = frozen_image
        self.text_prefix = text_prefix
        self.image_prefix = image_prefix
        self.present = inputs.image_present
        self.targets = inputs.pair_targets

    def __len__(self) -> int:
        return len(self.inputs.examples)

    def text(self, idx: Sequence[int]) -> EncodedSequence:
        if self.frozen_text is not None:
            return self.frozen_text.take(idx, self.device)
        if self.text_prefix is not None:
            cached = self.text_prefix.states.take(idx, self.device)
            return self.model.text_encoder.forward_from(cached.tokens, cached.mask, self.text_prefix.start)
        ids, mask = self.text_pre([self.inputs.text_of(i) for i in idx])
        return self.model.text_encoder(ids.to(self.device), mask.to(self.device))

    def image(self, idx: Sequence[int]) -> EncodedSequence:
        if self.frozen_image is not None:
            return self.frozen_image.take(idx, self.device)
        if self.image_prefix is not None:
            maps = self.image_prefix.maps(idx, self.device)
            return self.model.image_encoder.forward_from(maps, self.image_prefix.start)
        pixels, _ = self.image_pre([self.inputs.images[i] for i in idx])
        return self.model.image_encoder(pixels.to(self.device))

    def batch(self, idx: Sequence[int]) -> tuple[EncodedSequence, EncodedSequence, Tensor]:
        return self.text(idx), self.image(idx), self.present[list(idx)].to(self.device)

    def pair_target(self, idx: Sequence[int]) -> Tensor:
        """[B] ITM targets of the posts' own pairs (1 match, 0 mismatch, NaN unknown)."""
        return self.targets[list(idx)].to(self.device)

    def same_content(self, idx: Sequence[int]) -> Tensor:
        """[B, B] True where two posts share their image bytes or their text: pairing one's
        text with the other's image is not a real ITM negative (reposts, duplicates)."""
        examples, hashes = self.inputs.examples, self.inputs.image_hashes
        texts = [examples[i].text for i in idx]
        images = [hashes[i] for i in idx]
        same = [
            [a == b or (h is not None and h == g) for b, g in zip(texts, images, strict=True)]
            for a, h in zip(texts, images, strict=True)
        ]
        return torch.tensor(same, dtype=torch.bool, device=self.device)


@torch.no_grad()
def encode_frozen(
    model: MultimodalModel,
    tokenizer: object,
    inputs: LoadedInputs,
    which: str,
    store: FeatureStore,
    device: torch.device,
    progress: bool = False,
    text_start: int | None = None,
    image_start: int | None = None,
) -> FrozenSequences:
    """Token sequences of a frozen encoder for every example, via the on-disk cache; with
    `text_start`, the text encoder's hidden states at the input of that layer instead; with
    `image_start`, the image encoder's feature map at the input of that unit, as H*W tokens
    (posts without an image get the map of the blank image the live path would feed)."""
    from tqdm import tqdm

    key = encoder_key(model, which)
    if text_start is not None:
        key += f"-layer{text_start}"
    if image_start is not None:
        key += f"-unit{image_start}"  # (encoder_key covers the input size the map's shape follows)
    live = LiveFeatures(model, tokenizer, inputs, device)
    max_len, pair = model.config.max_text_length, model.config.ocr_segment
    digests = [
        _text_key(inputs.text_of(i), max_len, pair) if which == "text" else (h or "")
        for i, h in enumerate(inputs.image_hashes)
    ]
    out: list[Tensor | None] = [None] * len(digests)
    todo: list[int] = []
    blank: Tensor | None = None
    was_training = model.training
    model.eval()
    for i, digest in enumerate(digests):
        if not digest:  # no image: a placeholder the present-mask hides
            if image_start is None:
                out[i] = torch.zeros(1, model.image_encoder.dim, dtype=torch.float16)
            else:
                blank = _blank_map(model, live, image_start, device) if blank is None else blank
                out[i] = blank
            continue
        cached = store.get(key, digest)
        if cached is None:
            todo.append(i)
        else:
            out[i] = cached
    chunks = range(0, len(todo), ENCODE_BATCH)
    for start in tqdm(chunks, desc=f"encode {which}", disable=not progress or not todo):
        idx = todo[start : start + ENCODE_BATCH]
        if text_start is not None:
            ids, mask = live.text_pre([inputs.text_of(i) for i in idx])
            states = model.text_encoder.hidden_states_at(ids.to(device), mask.to(device), text_start)
            keep = mask.bool().to(device)
        elif image_start is not None:
            pixels, _ = live.image_pre([inputs.images[i] for i in idx])
            states = model.image_encoder.maps_at(pixels.to(device), image_start).flatten(2).transpose(1, 2)
            keep = torch.ones(states.shape[:2], dtype=torch.bool, device=device)
        else:
            seq = live.text(idx) if which == "text" else live.image(idx)
            states, keep = seq.tokens, seq.mask
        for row, i in enumerate(idx):
            tokens = states[row][keep[row]].to("cpu", torch.float16)
            out[i] = tokens
            store.put(key, digests[i], tokens)
    model.train(was_training)
    return FrozenSequences.stack([t for t in out if t is not None])


def _blank_map(model: MultimodalModel, live: LiveFeatures, start: int, device: torch.device) -> Tensor:
    """Unit `start`'s input for the blank image that stands in for a missing one, as tokens."""
    pixels, _ = live.image_pre([None])
    maps = model.image_encoder.maps_at(pixels.to(device), start)
    return maps[0].flatten(1).transpose(0, 1).to("cpu", torch.float16)


def build_features(
    model: MultimodalModel,
    tokenizer: object,
    inputs: LoadedInputs,
    store: FeatureStore,
    device: torch.device,
    progress: bool = False,
) -> LiveFeatures:
    """Cache whichever encoder is frozen, and the frozen part of a partly unfrozen encoder;
    run the rest live."""
    cfg = model.config
    if cfg.ocr_segment and inputs.ocr_texts is None:
        inputs.ocr_texts = read_image_texts(inputs, store, TesseractOcr(cfg.ocr_languages), progress)
    frozen_text = (
        encode_frozen(model, tokenizer, inputs, "text", store, device, progress)
        if cfg.text_trainable_layers == 0
        else None
    )
    frozen_image = (
        encode_frozen(model, tokenizer, inputs, "image", store, device, progress)
        if cfg.image_trainable_blocks == 0
        else None
    )
    prefix = (
        text_prefix(model, tokenizer, inputs, cfg.text_trainable_layers, store, device, progress)
        if cfg.text_trainable_layers > 0
        else None
    )
    image_start = (
        image_prefix(model, inputs, cfg.image_trainable_blocks, store, device, progress)
        if cfg.image_trainable_blocks > 0
        else None
    )
    return LiveFeatures(model, tokenizer, inputs, device, frozen_text, frozen_image, prefix, image_start)


def text_prefix(
    model: MultimodalModel,
    tokenizer: object,
    inputs: LoadedInputs,
    trainable_layers: int,
    store: FeatureStore,
    device: torch.device,
    progress: bool = False,
) -> TextPrefix | None:
    """The cached frozen part of a text encoder whose top `trainable_layers` train, or None
    (run it all live) when the split does not reproduce the encoder on a probe batch."""
    encoder = model.text_encoder
    start = len(encoder.layers()) - trainable_layers
    probe = [inputs.text_of(i) for i in range(min(4, len(inputs.examples)))]
    if not probe:
        return None
    ids, mask = TextPreprocessor(tokenizer, model.config.max_text_length, model.config.ocr_segment)(probe)
    if not encoder.supports_split(ids.to(device), mask.to(device), start):
        log.warning(
            "text encoder cannot be split at layer %d of %d; running all of it live", start, start + trainable_layers
        )
        return None
    return TextPrefix(encode_frozen(model, tokenizer, inputs, "text", store, device, progress, start), start)


def image_prefix(
    model: MultimodalModel,
    inputs: LoadedInputs,
    trainable_blocks: int,
    store: FeatureStore,
    device: torch.device,
    progress: bool = False,
) -> ImagePrefix | None:
    """The cached frozen part of an image encoder whose last `trainable_blocks` units train,
    or None (run it all live) when the encoder cannot be split or there are no images."""
    encoder = model.image_encoder
    units = len(encoder.units())
    start = units - trainable_blocks
    probe = [im for im in inputs.images if im is not None][:4]
    if not probe:
        return None
    pre = ImagePreprocessor(encoder.image_size, encoder.mean, encoder.std)
    pixels, _ = pre(probe)
    if not encoder.supports_split(pixels.to(device), start):
        log.warning(
            "image encoder %s cannot be split at unit %d of %d; running all of it live",
            type(encoder).__name__,
            start,
            units,
        )
        return None
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        _, _, height, width = encoder.maps_at(pixels[:1].to(device), start).shape
    encoder.train(was_training)
    states = encode_frozen(model, None, inputs, "image", store, device, progress, image_start=start)
    return ImagePrefix(states, start, int(height), int(width))


def subset(features: LiveFeatures, idx: Sequence[int]) -> LiveFeatures:
    """`features` restricted to `idx` (a split of a fold), with the same model."""
    inputs = features.inputs
    sub_inputs = LoadedInputs(
        [inputs.examples[i] for i in idx],
        [inputs.images[i] for i in idx],
        [inputs.image_hashes[i] for i in idx],
        ocr_texts=None if inputs.ocr_texts is None else [inputs.ocr_texts[i] for i in idx],
    )
    return LiveFeatures(
        features.model,
        features.text_pre.tokenizer,
        sub_inputs,
        features.device,
        None if features.frozen_text is None else features.frozen_text.subset(idx),
        None if features.frozen_image is None else features.frozen_image.subset(idx),
        None if features.text_prefix is None else features.text_prefix.subset(idx),
        None if features.image_prefix is None else features.image_prefix.subset(idx),
    )


def read_image_texts(
    inputs: LoadedInputs, store: FeatureStore, engine: OcrEngine, progress: bool = False
) -> list[str | None]:
    """The text inside every image, through the on-disk cache next to the features (keyed by
    the image's content hash and the engine's identity). An image OCR cannot read leaves its
    post without OCR text (counted in the log), never fails the run."""
    from tqdm import tqdm

    key = f"ocr-{engine.identity}"
    texts: list[str | None] = [None] * len(inputs.images)
    failed = 0
    rows = [i for i, h in enumerate(inputs.image_hashes) if h is not None and inputs.images[i] is not None]
    for i in tqdm(rows, desc="ocr", disable=not progress):
        digest = inputs.image_hashes[i]
        image = inputs.images[i]
        assert digest is not None and image is not None
        cached = store.get_text(key, digest)
        if cached is None:
            try:
                cached = engine(image)
            except OcrError as exc:
                failed += 1
                log.debug("OCR failed on image %s: %s", digest[:12], exc)
                continue
            store.put_text(key, digest, cached)
        texts[i] = cached
    if failed:
        log.warning("OCR failed on %d of %d images; those posts have no OCR text", failed, len(rows))
    return texts
