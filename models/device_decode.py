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

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from models.images import simplejpeg

# Known and planned for (the module docstring): not news to every process that decodes.
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)

# nvJPEG decodes at full size: a 12 MP photo takes 36 MB of device memory while it is resized.
# Bigger JPEGs (rare: phone photos are 12 MP, memes far less) take the host's DCT-scaled path.
DEVICE_MAX_PIXELS = 12_000_000
# Colour forms nvJPEG and the host decode alike; CMYK/YCCK JPEGs are left to Pillow on the host.
_DEVICE_COLORSPACES = frozenset({"YCbCr", "Gray"})
_DEVICE_MODES = frozenset({"RGB", "L"})  # the same, as Pillow names them


def jpeg_header_ok(data: bytes, max_pixels: int = DEVICE_MAX_PIXELS) -> bool:
    """Whether `data` is a JPEG the device may decode: its header parses, its colour space is
    one nvJPEG and the host decode the same way, and it is within `max_pixels`. Anything else
    (another format, CMYK, a damaged header, a huge photo) goes the host path."""
    if not data.startswith(b"\xff\xd8\xff"):
        return False
    if simplejpeg is None:  # a few µs more: Pillow parses the same header
        return _pillow_header_ok(data, max_pixels)
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return False
    return colorspace in _DEVICE_COLORSPACES and 0 < width * height <= max_pixels


def _pillow_header_ok(data: bytes, max_pixels: int) -> bool:
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
            width, height = image.size
            return image.mode in _DEVICE_MODES and 0 < width * height <= max_pixels
    except Exception:  # any header Pillow cannot parse stays on the host, which names the error
        return False


@dataclass(frozen=True)
class EncodedJpeg:
    """A post's JPEG handed to the predictor undecoded (its header checked: `jpeg_header_ok`):
    models.inference.Predictor decodes it on its device."""

    data: bytes


@dataclass
class DeviceDecoded:
    """`pixels`: [B, 3, side, side] uint8 on the device, rows in input order; the rows named in
    `failed` are zeros and those images must be decoded on the host."""

    pixels: Tensor
    failed: list[int]


def decode_jpegs_to(bodies: Sequence[bytes], side: int, device: torch.device | str) -> DeviceDecoded:
    """Decode JPEG `bodies` on `device` (batched) and squash each to `side` x `side`.

    One corrupt JPEG fails torchvision's batched call for all: the batch is then retried one
    image at a time, so only the bad ones land in `failed`."""
    device = torch.device(device)
    pixels = torch.zeros(len(bodies), 3, side, side, dtype=torch.uint8, device=device)
    if not bodies:
        return DeviceDecoded(pixels, [])
    # decode_jpeg reads its input from host tensors; bytearray: torch.frombuffer wants a writable buffer.
    encoded = [torch.frombuffer(bytearray(body), dtype=torch.uint8) for body in bodies]
    failed: list[int] = []
    try:
        images: list[Tensor | None] = list(_decode(encoded, device))
    except RuntimeError:
        images = []
        for i, one in enumerate(encoded):
            try:
                images.append(_decode([one], device)[0])
            except RuntimeError:
                images.append(None)
                failed.append(i)
    for i, image in enumerate(images):
        if image is not None:
            pixels[i] = squash(image, side)
    return DeviceDecoded(pixels, failed)


def _decode(encoded: list[Tensor], device: torch.device) -> list[Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg  # torchvision comes with timm

    out = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    return list(out) if isinstance(out, list) else [out]


def squash(image: Tensor, side: int) -> Tensor:
    """[3, H, W] uint8 -> [3, side, side] uint8: the whole image, aspect ratio not kept (text
    printed on memes sits at the edges), bilinear with antialiasing when shrinking."""
    if image.shape[-2:] == (side, side):
        return image
    resized = F.interpolate(
        image.unsqueeze(0).float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False
    )
    return resized.squeeze(0).round_().clamp_(0, 255).to(torch.uint8)
