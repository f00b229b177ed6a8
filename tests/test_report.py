"""The run report: sample grid geometry, escaping of user text, inline image, Markdown tables."""

from __future__ import annotations

import base64
import html
import io
import re

import pytest
from PIL import Image

from datadream import report
from datadream.data.manifest import ClassInfo, Record, slugify, write_classes, write_manifest
from datadream.io import atomic_write_json, sha256_file

NAMES = ["red", "<script>alert(1)</script>", "F/A-18 | jet"]
CLASSES = [ClassInfo(i, slugify(n), n) for i, n in enumerate(NAMES)]


def _colour(label: int, index: int, real: bool) -> tuple[int, int, int]:
    """Distinct per class, image index and real/synthetic, so pixels say which file landed where."""
    return (40 + 60 * label, 10 * index, 200 if real else 0)


def _image_set(folder, per_class: int, real: bool, manifest: str) -> None:
    records = []
    for c in CLASSES:
        for i in reversed(range(per_class)):  # manifest order is not index order: the grid must sort
            path = folder / c.slug / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (24, 24), _colour(c.index, i, real)).save(path)
            records.append(Record(str(path), c.index, c.slug, sha256_file(path), real, {"index": i}))
    write_classes(folder / "classes.json", CLASSES)
    write_manifest(folder / manifest, records)


@pytest.fixture
def sets(tmp_path):
    synthetic, fewshot = tmp_path / "synthetic", tmp_path / "fewshot"
    _image_set(synthetic, 5, real=False, manifest="manifest.jsonl")
    _image_set(fewshot, 3, real=True, manifest="train.jsonl")
    return synthetic, fewshot


def _metrics(top1: float) -> dict:
    slugs = [c.slug for c in CLASSES]
    return {"top1": top1, "top5": 1.0, "top5_k": 3, "mean_per_class": top1, "n": 30, "rejected": 1,
            "per_class": dict(zip(slugs, [top1, 0.5, None], strict=True)),
            "per_class_n": dict(zip(slugs, [10, 20, 0], strict=True))}


CLASSIFIER = {"classes": [{"index": c.index, "slug": c.slug, "name": c.name} for c in CLASSES],
              "train_on": "synthetic", "best_epoch": 2,
              "history": [{"epoch": 0, "val_top1": 0.3}, {"epoch": 1, "val_top1": 0.5}, {"epoch": 2, "val_top1": 0.75}]}
RESULTS = [
    {"setting": "DataDream <dataset>", "metrics": _metrics(0.8125), "classifier": CLASSIFIER,
     "confusion": {"classes": [c.slug for c in CLASSES], "counts": [[8, 2, 0], [10, 10, 0], [0, 0, 0]]}},
    {"setting": "real only", "metrics": _metrics(0.4375), "classifier": None},
]


def _cell_pixel(grid: Image.Image, x: int, row: int, thumb: int) -> tuple[int, int, int]:
    return grid.getpixel((x + thumb // 2, report.PAD + row * (thumb + report.PAD) + thumb // 2))


def test_grid_geometry_and_order(sets):
    synthetic, fewshot = sets
    thumb, cell = 16, 16 + report.PAD
    grid = report.sample_grid(synthetic, CLASSES, per_class=4, thumb=thumb, fewshot_dir=fewshot)
    synth_x = report.LABEL_WIDTH + report.SHOTS * cell + report.SEPARATOR
    assert grid.size == (synth_x + 4 * cell + report.PAD, report.PAD + len(CLASSES) * cell)
    for c in CLASSES:  # first images by index, shots before the separator, synthetic after it
        assert _cell_pixel(grid, report.LABEL_WIDTH + cell, c.index, thumb) == _colour(c.index, 1, real=True)
        assert _cell_pixel(grid, synth_x, c.index, thumb) == _colour(c.index, 0, real=False)
        assert _cell_pixel(grid, synth_x + 3 * cell, c.index, thumb) == _colour(c.index, 3, real=False)

    plain = report.sample_grid(synthetic, None, per_class=8, thumb=thumb)  # classes from classes.json
    assert plain.size == (report.LABEL_WIDTH + 8 * cell + report.PAD, report.PAD + 3 * cell)
    assert _cell_pixel(plain, report.LABEL_WIDTH + 5 * cell, 0, thumb) == (255, 255, 255)  # only 5 images


def test_grid_caps_classes_and_survives_bad_files(sets):
    synthetic, _ = sets
    (synthetic / CLASSES[0].slug / "00000.png").write_bytes(b"not a png")
    grid = report.sample_grid(synthetic, CLASSES, per_class=2, thumb=16, max_classes=2)
    assert grid.size[1] == report.PAD + 2 * (16 + report.PAD) + report.NOTE_HEIGHT
    assert _cell_pixel(grid, report.LABEL_WIDTH, 0, 16) == (200, 200, 200)  # placeholder, no crash


def test_html_escapes_and_embeds_grid(sets):
    synthetic, fewshot = sets
    page = report.render_html("Run <1>", RESULTS, synthetic, fewshot, extra={"shots": 16, "model": "<b>x</b>"})
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>x</b>" not in page and "Run &lt;1&gt;" in page
    for r in RESULTS:
        assert html.escape(r["setting"]) in page
        assert f"{100 * r['metrics']['top1']:.1f}%" in page
    assert "2 / 75.0%" in page  # best epoch / its val top-1, from history
    assert "rgba(31,119,180,0.50)" in page  # confusion shading: 10 of 20 in the row
    assert "http" not in page and "<link" not in page  # nothing fetched from elsewhere

    (uri,) = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    embedded = Image.open(io.BytesIO(base64.b64decode(uri)))
    assert embedded.format == "PNG"
    assert embedded.size == report.sample_grid(synthetic, fewshot_dir=fewshot).size


def test_markdown_tables(sets, tmp_path):
    synthetic, _ = sets
    md = report.render_markdown("Run", RESULTS, synthetic, extra={"k": 16})
    assert "<script>" not in md
    assert "| DataDream &lt;dataset&gt; | 81.2% | 100.0% | 81.2% | 30 (1 rejected) | synthetic | 2 / 75.0% |" in md
    assert "| real only | 43.8% |" in md
    assert "| F/A-18 &#124; jet | 0 | – | – |" in md  # '|' in a name cannot split the cell
    assert "| red | 8 | 2 | 0 |" in md  # confusion row
    assert "| k | 16 |" in md
    (uri,) = re.findall(r"!\[sample grid\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", md)
    assert Image.open(io.BytesIO(base64.b64decode(uri))).size == report.sample_grid(synthetic).size

    out = tmp_path / "report" / "report.md"
    report.write_report(out, md)
    assert out.read_text(encoding="utf-8") == md


def test_load_result_reads_stage_folders(tmp_path):
    ev, clf = tmp_path / "eval", tmp_path / "clf"
    atomic_write_json(ev / "metrics.json", _metrics(0.5))
    (ev / "confusion.csv").write_text("true\\predicted,a,b\na,3,1\nb,0,4\n", encoding="utf-8")
    atomic_write_json(clf / "classifier.json", CLASSIFIER)
    result = report.load_result("s", ev, clf)
    assert result["confusion"] == {"classes": ["a", "b"], "counts": [[3, 1], [0, 4]]}
    assert result["classifier"]["best_epoch"] == 2 and result["metrics"]["top1"] == 0.5
    assert report.load_result("s", ev)["classifier"] is None


def test_confusion_image_shades_rows_and_shrinks_for_many_classes():
    counts = [[8, 2, 0], [0, 10, 0], [5, 0, 5]]
    image = report.confusion_image(["red", "green", "blue"], counts, cell=20)
    label_w = image.width - 3 * 20 - report.PAD
    assert label_w > 0 and image.height == 16 + 3 * 20 + report.PAD

    def shade(i, j):  # the cell's corner pixel: darker = larger share of its row
        return sum(image.getpixel((label_w + j * 20 + 1, 16 + i * 20 + 1)))

    assert shade(1, 1) < shade(0, 0) < shade(2, 0) < shade(0, 1) < shade(0, 2) == 3 * 255
    big = report.confusion_image([f"c{i}" for i in range(400)], [[1] * 400 for _ in range(400)])
    assert max(big.size) <= 1200 + report.PAD  # a heat map of a few pixels per cell, no labels
