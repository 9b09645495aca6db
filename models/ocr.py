"""Text printed inside images, read with Tesseract: a pure image -> text transform.

Shared by the trainer and the stream worker so both read the same words from the same
pixels: `ocr_ready_image` fixes the resolution Tesseract sees (memes are often ~225 px, far
below the ~30 px letter height Tesseract is tuned for, so small images are upscaled; large
ones are capped so one upload cannot make OCR slow), `clean_text` fixes the spacing. Caches
belong to the callers (an LRU in the worker, the feature cache in the trainer), keyed by the
image's content hash and `TesseractOcr.identity`.

The binding is tesserocr: it calls libtesseract in-process (the PyPI wheel bundles it) and
releases the GIL while recognising, about 3x the throughput of pytesseract, which starts a
`tesseract` process per image (bench/ocr_cost.py). The language models are Debian's
`tesseract-ocr-eng` and `tesseract-ocr-hin` (deploy/test-tools.sh installs them).
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

DEFAULT_LANGUAGES = "eng+hin"
# Long side Tesseract gets: at least OCR_MIN_SIDE (upscaled), at most OCR_MAX_SIDE (shrunk).
OCR_MIN_SIDE = 1000
OCR_MAX_SIDE = 2000
# Bump when ocr_ready_image or clean_text change, so cached OCR text is recomputed.
PREP_VERSION = "1"
# Where Debian (and most distributions) put the language models; TESSDATA_PREFIX comes first.
TESSDATA_DIRS = (
    "/usr/share/tesseract-ocr/5/tessdata",
    "/usr/share/tesseract-ocr/4.00/tessdata",
    "/usr/share/tessdata",
    "/usr/local/share/tessdata",
)


class OcrUnavailable(RuntimeError):
    """Tesseract or one of its language models is missing: a setup error, raised at start."""


class OcrError(RuntimeError):
    """Reading one image failed; the caller carries on without its text."""


class OcrEngine(Protocol):
    """Anything that reads the text of one image (tests inject fakes)."""

    @property
    def identity(self) -> str: ...

    def __call__(self, image: Image.Image) -> str: ...


def ocr_ready_image(image: Image.Image) -> Image.Image:
    """Greyscale, long side scaled into [OCR_MIN_SIDE, OCR_MAX_SIDE]."""
    grey = image.convert("L")
    long_side = max(grey.size)
    if long_side < OCR_MIN_SIDE:
        scale = OCR_MIN_SIDE / long_side
    elif long_side > OCR_MAX_SIDE:
        scale = OCR_MAX_SIDE / long_side
    else:
        return grey
    size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
    return grey.resize(size, Image.Resampling.BICUBIC)


_NOISE_LINE = re.compile(r"^\W*$")


def clean_text(raw: str) -> str:
    """One line of words: lines without a letter or digit (stray marks read as `|`, `~`) are
    dropped and whitespace collapsed, so the model's token budget goes to words."""
    lines = (" ".join(line.split()) for line in raw.splitlines())
    return " ".join(line for line in lines if line and not _NOISE_LINE.match(line))


def find_tessdata(languages: str, tessdata: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding `<lang>.traineddata` for every language of `languages` ("eng+hin")."""
    wanted = [lang for lang in languages.split("+") if lang]
    if not wanted:
        raise OcrUnavailable(f"no OCR language given in {languages!r}")
    candidates = [tessdata] if tessdata else [os.environ.get("TESSDATA_PREFIX"), *TESSDATA_DIRS]
    for folder in candidates:
        if folder and all((Path(folder) / f"{lang}.traineddata").is_file() for lang in wanted):
            return Path(folder)
    looked = ", ".join(str(c) for c in candidates if c)
    raise OcrUnavailable(
        f"Tesseract language models {wanted} not found (looked in {looked}); install Debian's "
        "tesseract-ocr-eng and tesseract-ocr-hin (deploy/test-tools.sh) or set TESSDATA_PREFIX"
    )


class TesseractOcr:
    """Tesseract through tesserocr, safe to call from several threads (one engine per thread:
    a tesserocr API object is not thread-safe). `timeout_ms` bounds one image's recognition,
    so a pathological image cannot hold a decode thread."""

    def __init__(
        self,
        languages: str = DEFAULT_LANGUAGES,
        tessdata: str | os.PathLike[str] | None = None,
        timeout_ms: int = 5000,
    ) -> None:
        try:
            import tesserocr
        except ImportError as exc:  # the wheel bundles libtesseract, so this is a broken install
            raise OcrUnavailable(f"the tesserocr package cannot be imported: {exc}") from exc
        self._tesserocr: Any = tesserocr
        self.languages = languages
        self.tessdata = find_tessdata(languages, tessdata)
        self.timeout_ms = timeout_ms
        self._local = threading.local()
        version = tesserocr.tesseract_version().split()[1]
        self.identity = f"tesseract-{version}-{languages}-prep{PREP_VERSION}"
        self._api()  # fail now, not on the first post, when the models cannot be loaded

    def _api(self) -> Any:
        api = getattr(self._local, "api", None)
        if api is None:
            try:
                api = self._tesserocr.PyTessBaseAPI(path=f"{self.tessdata}/", lang=self.languages)
            except RuntimeError as exc:
                raise OcrUnavailable(f"Tesseract cannot load {self.languages} from {self.tessdata}: {exc}") from exc
            self._local.api = api
        return api

    def __call__(self, image: Image.Image) -> str:
        api = self._api()
        try:
            api.SetImage(ocr_ready_image(image))
            if not api.Recognize(timeout=self.timeout_ms):
                raise OcrError(f"Tesseract gave up on the image (timeout {self.timeout_ms} ms or bad input)")
            return clean_text(api.GetUTF8Text())
        except OcrError:
            raise
        except Exception as exc:  # whatever the binding raises for one image stays that image's failure
            raise OcrError(f"Tesseract failed: {exc!r}") from exc
        finally:
            api.Clear()
