"""Strict image loading: every file here is built in tmp_path with PIL/numpy."""

from __future__ import annotations

import io
import itertools
import pickle
import struct
import warnings

import numpy as np
import pytest
from PIL import Image

from datadream.data.images import (
    ALLOWED_FORMATS,
    IMAGE_SUFFIXES,
    ImageRejected,
    RejectionCounts,
    load_rgb,
    verify_image,
)


def _save(img: Image.Image, path, fmt: str, **kw):
    img.save(path, fmt, **kw)
    return path


def _noise_rgb(w=64, h=48, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _rejected(path, reason: str, **kw) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        load_rgb(path, **kw)
    exc = info.value
    assert exc.reason == reason, str(exc)
    assert str(path) in str(exc)
    assert "\n" not in str(exc)
    return exc


# --- a hand-built CMYK ICC profile (v2, lut16 A2B0, XYZ PCS), so no system profile is needed ---

_SRGB_TO_XYZ_D50 = np.array([[0.4360747, 0.3850649, 0.1430804],
                             [0.2225045, 0.7168786, 0.0606169],
                             [0.0139322, 0.0971045, 0.7141733]])


def _s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def _cmyk_icc(corner_rgb) -> bytes:
    """A CMYK profile whose 2x2x2x2 CLUT maps each ink corner (c, m, y, k in {0, 1}) to corner_rgb()."""
    clut = []
    for c, m, y, k in itertools.product((0, 1), repeat=4):
        rgb = np.asarray(corner_rgb(c, m, y, k), float)
        linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
        clut += [min(65535, round(v * 32768)) for v in _SRGB_TO_XYZ_D50 @ linear]
    a2b0 = (b"mft2" + bytes(4) + bytes([4, 3, 2, 0]) + b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
            + struct.pack(">HH", 2, 2) + struct.pack(">8H", *([0, 65535] * 4))
            + struct.pack(f">{len(clut)}H", *clut) + struct.pack(">6H", *([0, 65535] * 3)))
    text = b"test cmyk\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(8 + 3 + 67)
    wtpt = b"XYZ " + bytes(4) + _s15(0.9642) + _s15(1.0) + _s15(0.8249)
    cprt = b"text" + bytes(4) + b"none\0"
    tags = [(b"desc", desc), (b"wtpt", wtpt), (b"cprt", cprt), (b"A2B0", a2b0)]
    start = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        table += sig + struct.pack(">II", start + len(body), len(data))
        body += data + bytes(-len(data) % 4)
    header = (struct.pack(">I", start + len(body)) + bytes(4) + struct.pack(">I", 0x02100000) + b"prtr"
              + b"CMYK" + b"XYZ " + bytes(12) + b"acsp" + bytes(28)
              + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + bytes(48))
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def _naive_ink(c, m, y, k):
    return ((1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k))


def _rotated_ink(c, m, y, k):
    # A deliberately odd press: cyan ink prints yellow. Only a loader that honours the ICC sees it.
    return ((1 - m) * (1 - k), (1 - y) * (1 - k), (1 - c) * (1 - k))


# --- the happy paths ---


def test_constants():
    assert ALLOWED_FORMATS == ("JPEG", "PNG", "WEBP")
    assert {".jpg", ".jpeg", ".png", ".webp"} == IMAGE_SUFFIXES


@pytest.mark.parametrize("fmt,suffix", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")])
def test_allowed_formats_load_fully_as_rgb(tmp_path, fmt, suffix):
    path = _save(_noise_rgb(), tmp_path / f"a.{suffix}", fmt)
    img = load_rgb(path)
    assert img.mode == "RGB"
    assert img.size == (64, 48)
    assert img.im is not None  # decoded, not lazy
    verify_image(path)


def test_png_pixels_survive_unchanged(tmp_path):
    src = _noise_rgb()
    img = load_rgb(_save(src, tmp_path / "a.png", "PNG"))
    assert np.array_equal(np.asarray(img), np.asarray(src))


def test_content_decides_not_suffix(tmp_path):
    path = _save(_noise_rgb(), tmp_path / "really_a_png.jpg", "PNG")
    assert load_rgb(path).size == (64, 48)


def test_grayscale_l(tmp_path):
    img = load_rgb(_save(Image.new("L", (10, 10), 77), tmp_path / "l.png", "PNG"))
    assert img.mode == "RGB"
    assert img.getpixel((3, 3)) == (77, 77, 77)


def test_rgba_transparent_pixels_become_white(tmp_path):
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0] = 200  # red everywhere
    arr[:, :4, 3] = 0  # left half fully transparent
    arr[:, 4:, 3] = 255  # right half opaque
    arr[0, 4, 3] = 128  # one half-transparent pixel
    img = load_rgb(_save(Image.fromarray(arr), tmp_path / "rgba.png", "PNG"))
    assert img.mode == "RGB"
    assert img.getpixel((1, 1)) == (255, 255, 255)  # convert("RGB") would give (200, 0, 0)
    assert img.getpixel((6, 6)) == (200, 0, 0)
    r, g, b = img.getpixel((4, 0))
    assert 220 <= r <= 235 and 120 <= g <= 135 and g == b  # 50 % red over white


def test_la_transparent_becomes_white(tmp_path):
    la = Image.merge("LA", [Image.new("L", (6, 6), 10), Image.new("L", (6, 6), 0)])
    la.putpixel((0, 0), (10, 255))
    img = load_rgb(_save(la, tmp_path / "la.png", "PNG"))
    assert img.getpixel((3, 3)) == (255, 255, 255)
    assert img.getpixel((0, 0)) == (10, 10, 10)


def test_palette_with_transparency_becomes_white(tmp_path):
    p = Image.new("P", (6, 6), 1)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # 0 = black, 1 = blue
    p.putpixel((0, 0), 0)
    path = tmp_path / "p.png"
    p.save(path, "PNG", transparency=1)  # blue is the transparent index
    with Image.open(path) as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    img = load_rgb(path)
    assert img.getpixel((3, 3)) == (255, 255, 255)
    assert img.getpixel((0, 0)) == (0, 0, 0)


def test_palette_without_transparency(tmp_path):
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert load_rgb(_save(p, tmp_path / "p.png", "PNG")).getpixel((1, 1)) == (10, 200, 30)


def test_16bit_png_gradient_is_rescaled_not_clamped(tmp_path):
    gradient = np.tile(np.linspace(0, 65535, 1024).round().astype(np.uint16), (4, 1))
    path = _save(Image.fromarray(gradient), tmp_path / "g16.png", "PNG")
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
        assert len(np.unique(np.asarray(raw.convert("RGB")))) < 10  # the trap this guards against
    arr = np.asarray(load_rgb(path))
    assert arr.dtype == np.uint8
    assert arr.min() == 0 and arr.max() == 255
    assert len(np.unique(arr)) >= 250
    assert np.array_equal(arr[..., 0], arr[..., 2])
    mid = arr[0, 512, 0]
    assert 125 <= mid <= 130


@pytest.mark.parametrize("mode", ["I;16B", "I", "F"])
def test_other_high_depth_modes(tmp_path, mode):
    # Not producible by our formats' encoders, so exercise the conversion step directly.
    from datadream.data.images import _to_rgb

    values = np.linspace(0, 65535, 256)
    if mode == "I;16B":
        img = Image.frombytes(mode, (256, 1), values.astype(">u2").tobytes())
    elif mode == "I":
        img = Image.fromarray(values.astype(np.int32).reshape(1, -1))
    else:
        img = Image.fromarray((values / 65535).astype(np.float32).reshape(1, -1))  # floats in 0..1
    assert img.mode == mode
    arr = np.asarray(_to_rgb(img, "x"))
    assert arr.min() == 0 and arr.max() == 255 and len(np.unique(arr)) >= 250


def test_cmyk_without_icc_uses_plain_conversion(tmp_path):
    path = _save(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), tmp_path / "c.jpg", "JPEG", quality=95)
    r, g, b = load_rgb(path).getpixel((4, 4))
    assert r < 40 and g > 215 and b > 215


def test_cmyk_with_icc_profile_maps_cyan(tmp_path):
    path = _save(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), tmp_path / "c.jpg", "JPEG",
                 quality=95, icc_profile=_cmyk_icc(_naive_ink))
    r, g, b = load_rgb(path).getpixel((4, 4))
    assert r < 40 and g > 215 and b > 215


def test_cmyk_icc_profile_is_actually_used(tmp_path):
    path = _save(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), tmp_path / "c.jpg", "JPEG",
                 quality=95, icc_profile=_cmyk_icc(_rotated_ink))
    r, g, b = load_rgb(path).getpixel((4, 4))
    assert r > 215 and g > 215 and b < 40  # the profile says cyan ink looks yellow


def test_cmyk_with_broken_icc_falls_back(tmp_path):
    path = _save(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), tmp_path / "c.jpg", "JPEG",
                 quality=95, icc_profile=b"not a profile at all" * 10)
    r, g, b = load_rgb(path).getpixel((4, 4))
    assert r < 40 and g > 215 and b > 215


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left edge
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(img, tmp_path / "o.jpg", "JPEG", exif=exif.tobytes(), quality=95)
    out = load_rgb(path)
    assert out.size == (20, 40)
    r, _, b = out.getpixel((10, 3))  # the left strip is now on top
    assert b > 200 and r < 60


def test_broken_exif_is_ignored(tmp_path):
    path = _save(_noise_rgb(), tmp_path / "e.jpg", "JPEG", exif=b"Exif\x00\x00MM\x00*garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing per image, not even Pillow's "Corrupt EXIF data"
        assert load_rgb(path).size == (64, 48)


# --- rejections ---


def test_missing_file(tmp_path):
    exc = _rejected(tmp_path / "nope.jpg", "missing")
    assert exc.path == tmp_path / "nope.jpg"


def test_text_with_image_suffix(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n" * 20)
    _rejected(path, "not_an_image")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert "empty" in _rejected(path, "not_an_image").detail


@pytest.mark.parametrize("fmt,name", [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF")])
def test_disallowed_formats(tmp_path, fmt, name):
    path = _save(_noise_rgb(), tmp_path / "a.png", fmt)
    exc = _rejected(path, "format")
    assert name in exc.detail


def _jpeg_up_to_scan_data() -> bytes:
    good = io.BytesIO()
    _noise_rgb().save(good, "JPEG", quality=90)
    data = good.getvalue()
    sos = data.index(b"\xff\xda")
    return data[: sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")]


@pytest.mark.parametrize("with_eoi", [False, True])
def test_corrupt_jpeg_random_bytes_after_valid_header(tmp_path, with_eoi):
    # libjpeg only *warns* on corrupt entropy data, so Pillow alone decodes many of these "fine".
    header = _jpeg_up_to_scan_data()
    for seed in range(20):
        tail = np.random.default_rng(seed).integers(0, 256, 3000, dtype=np.uint8).tobytes()
        path = tmp_path / f"corrupt_{seed}.jpg"
        path.write_bytes(header + tail + (b"\xff\xd9" if with_eoi else b""))
        with Image.open(path) as lazy:
            assert lazy.size == (64, 48)  # the header alone looks fine
        with pytest.raises(ImageRejected) as info:
            load_rgb(path)
        assert info.value.reason in {"unreadable", "truncated"}, str(info.value)
        assert str(path) in str(info.value)


def test_jpeg_structure_walk():
    from datadream.data.images import _jpeg_structure_problem

    good = io.BytesIO()
    _noise_rgb().save(good, "JPEG", progressive=True, restart_marker_blocks=1)
    assert _jpeg_structure_problem(good.getvalue()) is None
    stray = _jpeg_up_to_scan_data() + b"\x12\x34" * 25 + b"\xff\x3a" + bytes(50) + b"\xff\xd9"
    reason, detail = _jpeg_structure_problem(stray)
    assert reason == "unreadable" and "0xFF3A" in detail
    assert _jpeg_structure_problem(good.getvalue()[:-2])[0] == "truncated"


def test_jpeg_without_end_marker(tmp_path):
    path = tmp_path / "no_eoi.jpg"
    good = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 99, 199)).save(good, "JPEG")
    assert good.getvalue().endswith(b"\xff\xd9")
    path.write_bytes(good.getvalue()[:-2])
    _rejected(path, "truncated")


def test_jpeg_trailer_after_end_marker_is_fine(tmp_path):
    good = io.BytesIO()
    _noise_rgb().save(good, "JPEG", progressive=True)
    path = tmp_path / "trailer.jpg"
    path.write_bytes(good.getvalue() + b"camera trailer \xff\x12\x00")
    assert load_rgb(path).size == (64, 48)


def test_jpeg_with_invalid_first_marker(tmp_path):
    path = tmp_path / "hdr.jpg"
    path.write_bytes(b"\xff\xd8\xff\x02" + bytes(100))
    assert "JPEG" in _rejected(path, "unreadable").detail


def test_jpeg_header_segment_longer_than_file(tmp_path):
    path = tmp_path / "hdr.jpg"
    path.write_bytes(b"\xff\xd8\xff\xdb\xff\xf0" + bytes(100))
    _rejected(path, "truncated")


def test_truncated_webp(tmp_path):
    good = io.BytesIO()
    _noise_rgb().save(good, "WEBP")
    path = tmp_path / "cut.webp"
    path.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    _rejected(path, "truncated")


def test_truncated_jpeg(tmp_path):
    good = io.BytesIO()
    _noise_rgb().save(good, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    _rejected(path, "truncated")


def test_truncated_png(tmp_path):
    good = io.BytesIO()
    _noise_rgb().save(good, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    _rejected(path, "truncated")


def test_refuses_to_run_with_truncated_loading_enabled(tmp_path, monkeypatch):
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # load_rgb never sets it
    good = io.BytesIO()
    _noise_rgb().save(good, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some other library might
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        load_rgb(path)


@pytest.fixture(scope="module")
def big_bilevel_pngs(tmp_path_factory):
    """Tiny files with huge headers: 12000² (between Pillow's warning and error levels) and 14000² (above)."""
    folder = tmp_path_factory.mktemp("bombs")
    paths = {}
    for side in (12000, 14000):
        paths[side] = folder / f"bomb_{side}.png"
        Image.new("1", (side, side)).save(paths[side], "PNG")
        assert paths[side].stat().st_size < 100_000
    return paths


def test_bomb_warning_level_is_an_error(big_bilevel_pngs):
    assert Image.MAX_IMAGE_PIXELS < 12000 * 12000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # even a caller that silences warnings gets the rejection
        exc = _rejected(big_bilevel_pngs[12000], "bomb")
    assert "144000000" in exc.detail


def test_bomb_error_level(big_bilevel_pngs):
    assert 2 * Image.MAX_IMAGE_PIXELS < 14000 * 14000
    _rejected(big_bilevel_pngs[14000], "bomb")


def test_bomb_under_explicit_cap(big_bilevel_pngs):
    _rejected(big_bilevel_pngs[12000], "bomb", max_pixels=10_000_000)


def test_per_call_cap_on_a_modest_image(tmp_path):
    path = _save(_noise_rgb(100, 100), tmp_path / "a.png", "PNG")
    exc = _rejected(path, "bomb", max_pixels=9_999)
    assert "10000" in exc.detail
    assert load_rgb(path, max_pixels=10_000).size == (100, 100)


def test_cap_holds_when_the_global_is_disabled(big_bilevel_pngs, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # what some other library might do
    _rejected(big_bilevel_pngs[12000], "bomb")


def test_bad_max_pixels():
    with pytest.raises(ValueError):
        load_rgb("x.png", max_pixels=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        load_rgb("x.png", max_pixels=0)


def test_png_text_chunk_bomb(tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "A" * (PngImagePlugin.MAX_TEXT_CHUNK + 10), zip=True)
    path = _save(Image.new("RGB", (4, 4)), tmp_path / "ztxt.png", "PNG", pnginfo=info)
    assert path.stat().st_size < 100_000
    _rejected(path, "bomb")


def test_verify_image_raises_the_same(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_text("hello")
    with pytest.raises(ImageRejected) as info:
        verify_image(path)
    assert info.value.reason == "not_an_image"


# --- the exception and the counter ---


def test_rejection_message_and_pickling(tmp_path):
    exc = ImageRejected(tmp_path / "a.png", "truncated", "image file\nis truncated")
    assert str(exc) == f"{tmp_path / 'a.png'}: truncated: image file is truncated"
    assert str(ImageRejected("b.png", "missing")) == "b.png: missing"
    back = pickle.loads(pickle.dumps(exc))
    assert (back.reason, str(back), back.path) == (exc.reason, str(exc), exc.path)


def test_rejection_counts(tmp_path):
    counts = RejectionCounts()
    assert counts.total == 0 and counts.to_dict()["by_reason"] == {}
    (tmp_path / "t.jpg").write_text("text")
    for path in [tmp_path / "gone1.png", tmp_path / "gone2.png", tmp_path / "t.jpg"]:
        try:
            load_rgb(path)
        except ImageRejected as exc:
            counts.add(exc)
    assert counts.total == 3
    assert counts.by_reason == {"missing": 2, "not_an_image": 1}
    d = counts.to_dict()
    assert d["total"] == 3 and d["by_reason"] == {"missing": 2, "not_an_image": 1}
    assert any("gone1.png" in e for e in d["examples"]["missing"])

    other = RejectionCounts()
    for i in range(10):
        other.add(ImageRejected(f"f{i}.png", "missing"))
    counts.merge(other)
    assert counts.by_reason["missing"] == 12
    assert len(counts.examples["missing"]) == RejectionCounts.max_examples


def test_rgb_colour_key_becomes_white(tmp_path):
    img = Image.new("RGB", (4, 4), (1, 2, 3))
    img.putpixel((0, 0), (200, 10, 10))
    out = load_rgb(_save(img, tmp_path / "key.png", "PNG", transparency=(1, 2, 3)))
    assert out.getpixel((2, 2)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (200, 10, 10)


def test_folder_instead_of_file(tmp_path):
    (tmp_path / "dir.png").mkdir()
    _rejected(tmp_path / "dir.png", "unreadable")


def test_unconvertible_mode_is_rejected():
    from datadream.data.images import _to_rgb

    with pytest.raises(ImageRejected) as info:
        _to_rgb(Image.new("La", (2, 2)), "x.png")
    assert info.value.reason == "mode"


def test_warning_filters_are_restored(tmp_path):
    path = _save(_noise_rgb(), tmp_path / "a.jpg", "JPEG")
    before = list(warnings.filters)
    load_rgb(path)
    with pytest.raises(ImageRejected):
        load_rgb(tmp_path / "missing.png")
    assert list(warnings.filters) == before


# catch_warnings is process-global on Python 3.11: racing threads sometimes drop the bomb-as-error
# filter, and Pillow's plain warning escapes. The pixel cap must still reject every bomb.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_concurrent_loads_keep_every_check(tmp_path, big_bilevel_pngs):
    from concurrent.futures import ThreadPoolExecutor

    good = [_save(_noise_rgb(seed=i), tmp_path / f"g{i}.png", "PNG") for i in range(8)]
    jobs = (good + [big_bilevel_pngs[12000]] * 4) * 3

    def outcome(path):
        try:
            return load_rgb(path).size
        except ImageRejected as exc:
            return exc.reason

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(outcome, jobs))
    assert results == [(64, 48) if p in good else "bomb" for p in jobs]
