"""How far does the banks' PDQ of a JPEG move when the device decodes it instead of the host?

The host decodes a JPEG at the DCT scale covering the model's input (models.images.decode_for_model,
375 x 263 for a 1000 x 700 photo) and hashes that; a GPU worker decodes it at full size with
nvJPEG and hashes on the device (stream/banks/device_pdq.py). Bank entries are hashed on the host.
This compares, per JPEG, the host's hash with the device path's hash taken three ways:

- `full`: the full-size decode hashed as it is;
- `host_sized`: the full-size decode shrunk (bilinear, antialiased) to the host decode's size
  first, which is what the worker does (models.device_decode.host_sized);
- `host_full`: for scale, the host's own full-size decode (Pillow) hashed.

torchvision's CPU decoder stands in for nvJPEG here (tests/gpu checks nvJPEG on a card).

    .venv/bin/python studies/device_pdq_drift.py [--memes 300] [--photos 60] [--quality 85]

Reads the CM-Off-Meme sample from ../shared at run time (PNG, encoded here as JPEG in memory);
without it, the synthetic photos alone are measured. Answer: BENCHMARKS.md, "The banks' PDQ on
the device".
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.io import ImageReadMode, decode_jpeg  # noqa: E402

from models.device_decode import host_sized  # noqa: E402
from models.images import MODEL_SIDE, decode_for_model  # noqa: E402
from stream.banks.device_pdq import DevicePdq  # noqa: E402
from stream.banks.hashing import MATCH_DISTANCE, pdq_hash  # noqa: E402
from tests.reposts import photo_like  # noqa: E402
from trainer.importers import cm_off_meme_root  # noqa: E402


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def drift(bodies: list[bytes]) -> dict[str, list[int]]:
    hasher = DevicePdq(trim=False)
    out: dict[str, list[int]] = {"full": [], "host_sized": [], "host_full": []}
    for data in bodies:
        host = pdq_hash(decode_for_model(data))
        if not host.usable:  # never matched by PDQ: its drift does not matter
            continue
        full = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        for name, image in (("full", full), ("host_sized", host_sized(full, MODEL_SIDE))):
            found = hasher([image])[0]
            assert found is not None
            out[name].append(found.pdq.distance(host))
        out["host_full"].append(pdq_hash(Image.open(io.BytesIO(data)).convert("RGB")).distance(host))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memes", type=int, default=300)
    parser.add_argument("--photos", type=int, default=60)
    parser.add_argument("--quality", type=int, default=85)
    args = parser.parse_args()
    sets: dict[str, list[bytes]] = {}
    images = cm_off_meme_root() / "images"
    if images.is_dir():
        paths = sorted(images.glob("*.png"))[: args.memes]
        sets["CM-Off memes"] = [_jpeg(Image.open(p), args.quality) for p in paths]
    else:
        print(f"the CM-Off-Meme sample is not at {images}: synthetic photos only", file=sys.stderr)
    sets["synthetic 1000x700 photos"] = [
        _jpeg(photo_like(seed, (1000, 700)), args.quality) for seed in range(args.photos)
    ]
    print(f"PDQ bits from the host path's hash (match distance {MATCH_DISTANCE}), JPEG q{args.quality}")
    print(f"{'images':<28} {'n':>4} {'hashed as':<11} {'mean':>5} {'p50':>4} {'p95':>4} {'max':>4}")
    for name, bodies in sets.items():
        for way, values in drift(bodies).items():
            v = np.array(values)
            p50, p95 = np.percentile(v, 50), np.percentile(v, 95)
            print(f"{name:<28} {len(v):>4} {way:<11} {v.mean():>5.2f} {p50:>4.0f} {p95:>4.0f} {v.max():>4}")


if __name__ == "__main__":
    main()
