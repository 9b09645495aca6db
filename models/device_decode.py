"""JPEG photos decoded and resized on the accelerator (issue 22 part 4): the host then only
checks each JPEG's header and copies its bytes.

Why: on a lent H200 the bare forward ran ~10k posts/s while the worker's device pool ran
1-1.5k, the host decoding JPEGs (~1.8 ms of CPU each with libjpeg-turbo's DCT scaling, the
model's resize another ~0.6 ms). nvJPEG through `torchvision.io.decode_jpeg(list, device="cuda")`
decodes a whole batch in one call.

What stays on the host, and why:
- the header check (`jpeg_header_ok`): the allow-list is JPEG only (PNG, WebP, GIF, BMP and
  CMYK JPEGs keep the host path), and the pixel budget holds on the device too: nvJPEG decodes at
  full size (no DCT scaling), so a JPEG over `DEVICE_MAX_PIXELS` decodes on the host, where it
  is DCT-scaled, instead of taking ~36 MB of device memory per 12 MP;
- every failure: torchvision's batched decode fails the whole batch for one bad image, so the
  batch is retried one image at a time and an image that still fails is reported back by index
  for the host path (models.images.decode_image names the error there).

The resize is the whole image squashed to the model's square input (models.images.model_input's
rule), bilinear with antialiasing as Pillow's reducing resize. It starts from the full-size
decode where the host starts from a DCT-scaled one, so pixels differ by a few grey levels
(tests/unit/test_device_decode.py states the bound, on the CPU; tests/gpu on nvJPEG).

torchvision marks its image decoders deprecated since 0.29 in favour of TorchCodec; the call
is kept to `decode_jpegs_to` so a move to TorchCodec's batched decoder touches one function.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from models.images import jpeg_decode_size, simplejpeg

# Known and planned for (the module docstring): not news to every process that decodes.
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)

# nvJPEG decodes at full size: a 12 MP photo takes 36 MB of device memory while it is resized.
# Bigger JPEGs (rare: phone photos are 12 MP, memes far less) take the host's DCT-scaled path.
DEVICE_MAX_PIXELS = 12_000_000
# Pixels decoded by one torchvision call (its outputs are all allocated at once): 256 MP is
# ~770 MB of device memory, so a batch of 1,024 photos is decoded in a few calls, not 37 GB; while
# they are resized, one stack's float copy (STACK_MAX_PIXELS, 384 MB) and its outputs come on top.
CALL_MAX_PIXELS = 256_000_000
# Colour forms nvJPEG and the host decode alike; CMYK/YCCK JPEGs are left to Pillow on the host.
_DEVICE_COLORSPACES = frozenset({"YCbCr", "Gray"})
# Baseline and extended sequential Huffman JPEGs (SOF0, SOF1). Progressive and arithmetic-coded
# ones take torchvision's software path, full size, one at a time on the device's thread: the
# host decodes them (DCT-scaled) instead, so a raid of big progressive JPEGs cannot stall a batch.
_SEQUENTIAL_SOF = frozenset({0xC0, 0xC1})
_MAX_SEGMENTS = 64  # markers read before the frame header: real files have a handful
# Decoded images of one size are resized as one stack, a float copy of at most this many pixels
# (384 MB): on top of a call's decoded images, the most a call holds at once.
STACK_MAX_PIXELS = 32_000_000


@dataclass(frozen=True)
class FrameHeader:
    sof: int  # the SOFn marker's second byte
    precision: int
    height: int
    width: int
    components: int


def frame_header(data: bytes) -> FrameHeader | None:
    """The JPEG's frame header (SOFn), read by walking its marker segments from the start;
    None when there is none before the scan, the data is cut, or more than _MAX_SEGMENTS
    segments come first (a crafted file of tiny segments costs a bounded walk)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    i, n = 2, len(data)
    for _ in range(_MAX_SEGMENTS):
        while i < n and data[i] == 0xFF and i + 1 < n and data[i + 1] == 0xFF:
            i += 1  # fill bytes
        if i + 4 > n or data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before them
            return None
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT, JPG, DAC)
            if length < 8 or i + 10 > n:
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return FrameHeader(marker, data[i + 4], height, width, data[i + 9])
        if length < 2:
            return None
        i += 2 + length
    return None


def jpeg_header_ok(data: bytes, max_pixels: int = DEVICE_MAX_PIXELS) -> bool:
    """Whether `data` is a JPEG the device may decode (`EncodedJpeg.of`)."""
    return EncodedJpeg.of(data, max_pixels) is not None


@dataclass(frozen=True)
class EncodedJpeg:
    """A post's JPEG handed to the predictor undecoded (its header checked: `of`):
    models.inference.Predictor decodes it on its device. `pixels`: width x height from the
    header, so batching by decoded size does not parse it again (None: parse when needed)."""

    data: bytes
    pixels: int | None = None

    @classmethod
    def of(cls, data: bytes, max_pixels: int = DEVICE_MAX_PIXELS) -> EncodedJpeg | None:
        """`data` to hand over when it is a JPEG the device may decode: a sequential 8-bit frame
        (baseline or extended Huffman), grey or three-component, within `max_pixels`, and a colour
        space nvJPEG and the host decode the same way. None for anything else (another format,
        CMYK, progressive, a damaged header, a huge photo): the host path decodes it or names the
        error."""
        if not data.startswith(b"\xff\xd8\xff"):
            return None
        frame = frame_header(data)
        if frame is None or frame.sof not in _SEQUENTIAL_SOF or frame.precision != 8 or frame.components not in (1, 3):
            return None
        pixels = frame.width * frame.height
        if not 0 < pixels <= max_pixels:
            return None
        if simplejpeg is not None:  # without it (a GPU image), the frame header has said enough
            try:
                _, _, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            except ValueError:
                return None
            if colorspace not in _DEVICE_COLORSPACES:
                return None
        return cls(data, pixels)


# What a caller computes from each decoded image before its pixels are freed: [3, H, W] uint8
# images on the device, each at the size the host's decode would give it (`host_sized`), in; one
# result per image out (the worker's bank hashes: stream/banks/device_pdq.py). It must not raise:
# an exception here would count as a failed decode.
ImageHook = Callable[[Sequence[Tensor]], Sequence[object]]


@dataclass
class DeviceDecoded:
    """`pixels`: [B, 3, side, side] uint8 on the device, rows in input order; the rows named in
    `failed` are zeros and those images must be decoded on the host. `found`: the image hook's
    result by row (decoded rows only)."""

    pixels: Tensor
    failed: list[int]
    found: dict[int, object] = field(default_factory=dict)


def decode_jpegs_to(
    bodies: Sequence[bytes | EncodedJpeg], side: int, device: torch.device | str, hook: ImageHook | None = None
) -> DeviceDecoded:
    """Decode JPEG `bodies` on `device` and squash each to `side` x `side`; with `hook`, also
    hand each image, at the size the host would decode it for this side, to `hook`.

    Batched in calls of at most CALL_MAX_PIXELS, each squashed and freed before the next. One
    bad JPEG fails torchvision's batched call for all (so does running out of device memory):
    a failed call is split in halves until the bad images stand alone in `failed`."""
    device = torch.device(device)
    jpegs = [body if isinstance(body, EncodedJpeg) else EncodedJpeg(body) for body in bodies]
    out = DeviceDecoded(torch.zeros(len(jpegs), 3, side, side, dtype=torch.uint8, device=device), [])
    for call in _calls(jpegs):
        _decode_into(out, call, [jpeg.data for jpeg in jpegs], side, device, hook)
    out.failed.sort()
    return out


def _decoded_pixels(jpeg: EncodedJpeg) -> int:
    if jpeg.pixels is not None:
        return jpeg.pixels
    frame = frame_header(jpeg.data)
    return frame.width * frame.height if frame is not None else DEVICE_MAX_PIXELS


def _calls(jpegs: Sequence[EncodedJpeg]) -> list[list[int]]:
    """Indices of `jpegs` grouped into calls of at most CALL_MAX_PIXELS decoded pixels."""
    calls: list[list[int]] = []
    current: list[int] = []
    budget = 0
    for i, jpeg in enumerate(jpegs):
        cost = _decoded_pixels(jpeg)
        if current and budget + cost > CALL_MAX_PIXELS:
            calls.append(current)
            current, budget = [], 0
        current.append(i)
        budget += cost
    if current:
        calls.append(current)
    return calls


def _decode_into(
    out: DeviceDecoded,
    rows: list[int],
    bodies: Sequence[bytes],
    side: int,
    device: torch.device,
    hook: ImageHook | None,
) -> None:
    # decode_jpeg reads its input from host tensors; bytearray: torch.frombuffer wants a writable buffer.
    encoded = [torch.frombuffer(bytearray(bodies[i]), dtype=torch.uint8) for i in rows]
    pixels: Tensor | None = None
    found: dict[int, object] | None = None
    with contextlib.suppress(RuntimeError):  # a bad JPEG, or torch.cuda.OutOfMemoryError (a RuntimeError)
        pixels, found = _decoded_call(encoded, side, device, hook)
    del encoded
    if pixels is not None and found is not None:  # a call's results count only when all of it worked
        out.pixels[rows] = pixels
        out.found.update((rows[k], value) for k, value in found.items())
        return
    # Retried outside the handler: the failed call's tensors are freed by now, not held by a traceback.
    if len(rows) == 1:
        out.failed.append(rows[0])
        return
    half = len(rows) // 2
    _decode_into(out, rows[:half], bodies, side, device, hook)
    _decode_into(out, rows[half:], bodies, side, device, hook)


def _decoded_call(
    encoded: list[Tensor], side: int, device: torch.device, hook: ImageHook | None
) -> tuple[Tensor, dict[int, object]]:
    """One torchvision call: [n, 3, side, side] uint8 and the hook's results by index."""
    images = _decode(encoded, device)
    pixels = torch.empty(len(images), 3, side, side, dtype=torch.uint8, device=device)
    found: dict[int, object] = {}
    for members in _same_size(images):
        # Photos come in a few sizes: each size resized as one stack, not one image at a time
        # (a few kernel launches per stack on the device's thread instead of per image), from
        # one float copy of at most STACK_MAX_PIXELS.
        stack = torch.stack([images[k] for k in members]).float()
        pixels[members] = _float_to(stack, (side, side))
        if hook is not None:
            small = _float_to(stack, _host_size(stack, side))
            found.update(zip(members, call_hook(hook, list(small.unbind(0))), strict=True))
        del stack
    return pixels, found


def call_hook(hook: ImageHook, images: Sequence[Tensor]) -> list[object]:
    """The hook's results for `images`, or None each when it raises or answers for other than
    `images` (the pipeline then does the hook's work on the host: a hook cannot fail a batch)."""
    try:
        found = list(hook(images))
    except Exception:
        return [None] * len(images)
    return found if len(found) == len(images) else [None] * len(images)


def _same_size(images: Sequence[Tensor]) -> list[list[int]]:
    """Indices of `images` grouped by size, in stacks of at most STACK_MAX_PIXELS (a stack is a
    float copy: 12 bytes a pixel)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(k)
    out = []
    for shape, members in groups.items():
        step = max(1, STACK_MAX_PIXELS // max(1, shape[-1] * shape[-2]))
        out += [members[i : i + step] for i in range(0, len(members), step)]
    return out


def _decode(encoded: list[Tensor], device: torch.device) -> list[Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg  # torchvision comes with timm

    out = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    return list(out) if isinstance(out, list) else [out]


def host_sized(image: Tensor, side: int) -> Tensor:
    """[..., 3, H, W] uint8 -> the size the host's decode for a model of `side` gives this JPEG
    (models.images.jpeg_decode_size: the DCT scale covering the model's input), bilinear with
    antialiasing. What the banks hash must not depend on which decoder ran: hashed at full size,
    CM-Off memes drift a mean 0.9 (at most 20) PDQ bits from the host's hash, at this size 0.3 (10)
    (studies/device_pdq_drift.py)."""
    size = _host_size(image, side)
    return image if size == tuple(image.shape[-2:]) else resize_uint8(image, size)


def _host_size(image: Tensor, side: int) -> tuple[int, int]:
    """(height, width) the host's decode for a model of `side` gives a JPEG decoded as `image`."""
    width, height = jpeg_decode_size((int(image.shape[-1]), int(image.shape[-2])), side)
    return height, width


def resize_uint8(image: Tensor, size: tuple[int, int]) -> Tensor:
    """[3, H, W] or [N, 3, H, W] uint8 resized to `size` (height, width): bilinear, antialiased
    when shrinking, rounded back to uint8."""
    batch = image if image.dim() == 4 else image.unsqueeze(0)
    out = _float_to(batch.float(), size)
    return out if image.dim() == 4 else out.squeeze(0)


def _float_to(batch: Tensor, size: tuple[int, int]) -> Tensor:
    """[N, 3, H, W] float pixels -> [N, 3, *size] uint8 (the same resize as resize_uint8)."""
    if tuple(batch.shape[-2:]) == size:
        return batch.round().clamp_(0, 255).to(torch.uint8)
    resized = F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def squash(image: Tensor, side: int) -> Tensor:
    """[..., 3, H, W] uint8 -> [..., 3, side, side] uint8: the whole image, aspect ratio not kept
    (text printed on memes sits at the edges), bilinear with antialiasing when shrinking."""
    if image.shape[-2:] == (side, side):
        return image
    return resize_uint8(image, (side, side))


def self_test(device: torch.device | str, side: int = 32) -> str | None:
    """Decode a small photo-like JPEG on `device` and compare it with the host path: None when
    they agree within a few grey levels, else why not (a torchvision built without nvJPEG, a
    driver that refuses it...). The worker runs it before choosing device decode."""
    import io

    import numpy as np
    from PIL import Image

    from models.images import decode_for_model, model_input

    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        (160, 120), Image.Resampling.BICUBIC
    )
    buf = io.BytesIO()
    coarse.save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    try:
        decoded = decode_jpegs_to([data], side, device)
    except Exception as exc:  # anything: the host path stays
        return f"{type(exc).__name__}: {exc}"
    if decoded.failed:
        return "the test JPEG failed to decode on the device"
    host = np.asarray(model_input(decode_for_model(data, side), side), dtype=np.int16)
    diff = np.abs(decoded.pixels[0].cpu().numpy().astype(np.int16) - host.transpose(2, 0, 1)).mean()
    return None if diff <= 4.0 else f"device pixels differ from the host's by {diff:.1f} grey levels on average"
