"""Strict loading of untrusted images (reliability notes, A2.2).

Every image a stage reads goes through `load_rgb`: an allow-list of formats, a per-call pixel cap
(Pillow's decompression-bomb warning is an error here), a full decode so truncated files fail now
rather than training on grey padding, EXIF orientation, and a mode conversion that neither clamps
16-bit data nor drops alpha onto black. A bad file raises `ImageRejected` with a short reason code;
callers count the codes with `RejectionCounts` and decide whether to skip or stop. Nothing is
logged per image.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default warning threshold

_WHITE = (255, 255, 255)
_HIGH_DEPTH = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})

# Magic numbers of allowed formats (to tell a damaged header from a foreign file) and of common
# formats we refuse (so the reason says "format" rather than "not_an_image"). Sniffing is ours on
# purpose: letting Pillow identify the file would run the very plugins the allow-list keeps out.
_ALLOWED_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"))
_FOREIGN_MAGIC = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "BigTIFF"), (b"MM\x00+", "BigTIFF"),
    (b"8BPS", "PSD"), (b"SIMPLE  =", "FITS"), (b"qoif", "QOI"), (b"DDS ", "DDS"), (b"icns", "ICNS"),
    (b"\x00\x00\x01\x00", "ICO"), (b"\x8aMNG", "MNG"), (b"\xffO\xffQ", "JPEG 2000"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (b"v/1\x01", "OpenEXR"), (b"#?RADIANCE", "HDR"),
    (b"%PDF", "PDF"), (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"),
)
# JPEG markers that carry a length-prefixed payload: SOFn/DHT/DAC, SOS/DQT/DNL/DRI/DHP/EXP, APPn, COM.
_JPEG_SEGMENT_MARKERS = frozenset([*range(0xC0, 0xD0), *range(0xDA, 0xE0), *range(0xE0, 0xF0), 0xFE])
_HEIF_BRANDS = {b"heic": "HEIF", b"heix": "HEIF", b"mif1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}
_BMP_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}


class ImageRejected(Exception):
    """A file that is not a usable image; `reason` is a short code for counting.

    Codes: missing, not_an_image, format, bomb, truncated, unreadable, mode.
    """

    def __init__(self, path: str | os.PathLike, reason: str, detail: str = ""):
        # All three go to Exception.args so the exception survives pickling across DataLoader workers.
        super().__init__(path, reason, detail)
        self.path = path
        self.reason = reason
        self.detail = " ".join(str(detail).split())  # always one line

    def __str__(self) -> str:
        head = f"{os.fspath(self.path)}: {self.reason}"
        return f"{head}: {self.detail}" if self.detail else head


@dataclass
class RejectionCounts:
    """Tally of rejected files per reason, with a few example paths per reason for the report."""

    by_reason: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: ClassVar[int] = 5

    def add(self, exc: ImageRejected) -> None:
        self.by_reason[exc.reason] = self.by_reason.get(exc.reason, 0) + 1
        shown = self.examples.setdefault(exc.reason, [])
        if len(shown) < self.max_examples:
            shown.append(str(exc))

    def merge(self, other: RejectionCounts) -> None:
        for reason, n in other.by_reason.items():
            self.by_reason[reason] = self.by_reason.get(reason, 0) + n
            shown = self.examples.setdefault(reason, [])
            shown.extend(other.examples.get(reason, [])[: self.max_examples - len(shown)])

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "by_reason": dict(sorted(self.by_reason.items())),
            "examples": {k: list(v) for k, v in sorted(self.examples.items())},
        }


def load_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, data: bytes | None = None) -> Image.Image:
    """Open, fully decode and normalise one image to 8-bit RGB; raise ImageRejected if unusable.

    With `data`, the image is those bytes (e.g. from a request) and `path` only names it in errors.
    `max_pixels` (width × height) is enforced here whatever `PIL.Image.MAX_IMAGE_PIXELS` says, but
    it cannot raise Pillow's own check: a cap above that global also needs the global raised.
    """
    if not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Process-wide, and it makes Pillow pad truncated files with grey instead of failing.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set in this process, so truncated images "
                           "cannot be detected; find and remove whatever sets it")
    # Pillow's per-file warnings ("Corrupt EXIF data", ...) are noise here: a file is either rejected
    # with a reason or used. Its bomb warning (between 1x and 2x the process-global cap) is a rejection.
    # Both filters are narrow on purpose: on Python 3.11 catch_warnings is not thread-safe, and if
    # threads race, what can leak is only this, while our own pixel cap below still holds.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            f = io.BytesIO(data) if data is not None else open(path, "rb")  # noqa: SIM115 -- closed below
        except (FileNotFoundError, NotADirectoryError):
            raise ImageRejected(path, "missing", "no such file") from None
        except OSError as e:
            raise ImageRejected(path, "unreadable", e.strerror or type(e).__name__) from None
        try:
            img = _open_and_decode(f, path, max_pixels)
        finally:
            f.close()
        return _to_rgb(img, path)


def verify_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Raise ImageRejected if `load_rgb` would; the same checks, result discarded."""
    load_rgb(path, max_pixels)


def _open_and_decode(f: io.BufferedReader, path, max_pixels: int) -> Image.Image:
    """Everything up to a fully decoded, upright image in its file's own mode."""
    head = f.read(32)
    f.seek(0)
    try:
        img = Image.open(f, formats=list(ALLOWED_FORMATS))
    except UnidentifiedImageError:
        raise _unidentified(path, head) from None
    except MemoryError:
        raise
    except Exception as e:
        raise _classify(path, e, f) from None
    # Our own cap, checked before decoding: it holds whatever the global is set to (even None).
    w, h = img.size
    if w * h > max_pixels:
        raise ImageRejected(path, "bomb", f"{w}x{h} = {w * h} pixels exceeds the cap of {max_pixels}")
    if w < 1 or h < 1:
        raise ImageRejected(path, "unreadable", f"empty image {w}x{h}")
    try:
        img.load()
    except MemoryError:
        raise
    except Exception as e:
        raise _classify(path, e, f) from None
    if img.format == "JPEG":
        # libjpeg only warns about corrupt entropy data and Pillow drops the warning, so a JPEG with
        # garbage after a valid header often decodes "fine". A structural pass catches most of those.
        f.seek(0)
        problem = _jpeg_structure_problem(f.read())
        if problem:
            raise ImageRejected(path, *problem)
    try:
        # While the file is open (some plugins read EXIF lazily). Broken EXIF only loses the hint.
        ImageOps.exif_transpose(img, in_place=True)
    except MemoryError:
        raise
    except Exception:
        pass
    return img


def _unidentified(path, head: bytes) -> ImageRejected:
    if not head:
        return ImageRejected(path, "not_an_image", "empty file")
    for magic, name in _ALLOWED_MAGIC:
        if head.startswith(magic):
            return ImageRejected(path, "unreadable", f"{name} header cannot be parsed")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ImageRejected(path, "unreadable", "WEBP header cannot be parsed")
    foreign = _sniff_foreign(head)
    if foreign:
        return ImageRejected(path, "format", f"{foreign} is not one of {', '.join(ALLOWED_FORMATS)}")
    return ImageRejected(path, "not_an_image", "not a recognised image file")


def _sniff_foreign(head: bytes) -> str | None:
    for magic, name in _FOREIGN_MAGIC:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return _HEIF_BRANDS[head[8:12]]
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"1234567" and head[2:3].isspace():
        return "PNM"
    return None


def _jpeg_structure_problem(data: bytes) -> tuple[str, str] | None:
    """Walk a JPEG's markers; (reason, detail) for the first invalid one or a missing EOI, else None."""
    buf = np.frombuffer(data, np.uint8)
    # Where entropy-coded data may end: 0xFF followed by anything but stuffing (0x00), fill (0xFF) or RSTn.
    ff = np.flatnonzero(buf[:-1] == 0xFF)
    after = buf[ff + 1]
    scan_ends = ff[(after != 0x00) & (after != 0xFF) & ((after < 0xD0) | (after > 0xD7))]
    pos, n = 2, len(data)  # after SOI
    while pos < n:
        if data[pos] != 0xFF:
            # Stray bytes between segments: libjpeg skips them with a warning, and so do we.
            pos = data.find(b"\xff", pos)
            if pos < 0:
                break
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            break
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI; anything after it (camera trailers) is not image data
            return None
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn, TEM: no payload
            continue
        if marker not in _JPEG_SEGMENT_MARKERS:
            return "unreadable", f"corrupt JPEG data: invalid marker 0xFF{marker:02X} at byte {pos - 2}"
        if pos + 2 > n:
            break
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2:
            return "unreadable", f"corrupt JPEG data: bad length {length} at byte {pos - 2}"
        pos += length
        if marker == 0xDA:  # SOS: jump over the entropy-coded data to the marker that ends it
            i = int(np.searchsorted(scan_ends, pos))
            if i == len(scan_ends):
                break
            pos = int(scan_ends[i])
    return "truncated", "JPEG has no end-of-image marker"


def _classify(path, e: Exception, f: io.BufferedReader | None = None) -> ImageRejected:
    """Map an exception from Pillow's open or decode to a reason code."""
    msg = str(e) or type(e).__name__
    if isinstance(e, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return ImageRejected(path, "bomb", msg)
    if isinstance(e, ValueError) and "too large" in msg.lower():
        # PngImagePlugin's MAX_TEXT_CHUNK / MAX_TEXT_MEMORY guards against compressed text bombs.
        return ImageRejected(path, "bomb", msg)
    if f is not None and _riff_is_short(f):
        return ImageRejected(path, "truncated", f"RIFF size exceeds the file ({msg})")
    if isinstance(e, EOFError) or "truncated" in msg.lower():
        return ImageRejected(path, "truncated", msg)
    return ImageRejected(path, "unreadable", f"{type(e).__name__}: {msg}")


def _riff_is_short(f: io.BufferedReader) -> bool:
    """A WEBP whose RIFF header promises more bytes than the file has; libwebp only says 'cannot decode'."""
    try:
        f.seek(0)
        head = f.read(12)
        if head[:4] != b"RIFF" or head[8:12] != b"WEBP":
            return False
        return int.from_bytes(head[4:8], "little") + 8 > os.fstat(f.fileno()).st_size
    except (OSError, ValueError):
        return False


def _to_rgb(img: Image.Image, path) -> Image.Image:
    """Any mode our formats decode to -> 8-bit RGB, without clamping or black-backed alpha."""
    mode = img.mode
    try:
        if mode == "RGB" and "transparency" not in img.info:
            return img
        if mode in _HIGH_DEPTH:
            return _rescale_to_l(img).convert("RGB")
        if mode == "CMYK":
            return _cmyk_to_rgb(img)
        # "transparency" in info: P with a tRNS palette alpha, or 1/L/RGB with a colour key.
        if mode in _ALPHA_MODES or "transparency" in img.info:
            rgba = img if mode == "RGBA" else img.convert("RGBA")
            out = Image.new("RGB", img.size, _WHITE)
            out.paste(rgba, mask=rgba)  # blends by alpha; convert("RGB") would leave black under it
            return out
        return img.convert("RGB")
    except MemoryError:
        raise
    except Exception as e:
        raise ImageRejected(path, "mode", f"cannot convert {mode} to RGB ({type(e).__name__}: {e})") from None


def _rescale_to_l(img: Image.Image) -> Image.Image:
    """16-bit and float data to 8 bits by bit depth or value range; convert('L') would clamp."""
    arr = np.asarray(img)  # I;16* -> uint16 (either byte order), I -> int32, F -> float32
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:
        lo, hi = 0.0, 65535.0
    else:
        arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
        elif img.mode == "I" and lo >= 0.0 and hi <= 65535.0:
            lo, hi = 0.0, 65535.0  # 32-bit container holding 16-bit data (older Pillow's 16-bit PNG)
    span = (hi - lo) or 1.0
    scaled = np.rint((arr.astype(np.float32) - lo) * (255.0 / span))
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))


_srgb_profile = None


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    """CMYK through the embedded ICC profile; Pillow's plain convert ignores it and over-saturates."""
    icc = img.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            global _srgb_profile
            if _srgb_profile is None:
                _srgb_profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            out = ImageCms.profileToProfile(img, src, _srgb_profile, outputMode="RGB")
            if out is not None:
                return out
        except MemoryError:
            raise
        except Exception:
            pass  # a broken or non-CMYK profile: the naive conversion is still a usable image
    return img.convert("RGB")
