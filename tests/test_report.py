"""The run report: sample grid geometry, the page's facts, tables and plots, escaping, file modes."""

from __future__ import annotations

import base64
import html
import io
import re

import pytest
from PIL import Image

from datadream import report
from datadream.data.manifest import ClassInfo, Record, slugify, write_classes, write_manifest
from datadream.io import sha256_file

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
    {"setting": "DataDream <dataset>", "classifier": CLASSIFIER,
     "metrics": {**_metrics(0.8125), "classes": [c.slug for c in CLASSES],
                 "confusion": [[8, 2, 0], [10, 10, 0], [0, 0, 0]]}},
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


RUN = {"dataset": "s3://bucket/<flowers>", "mode": "class", "shots": 16, "seed": 1, "git_sha": "0123abc",
       "gate": "promoted: test_top1 0.8125 beats champion version 1"}


def _images(page: str) -> dict[str, Image.Image]:
    """alt text -> decoded image, for every inline PNG on the page."""
    found = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return {html.unescape(alt): Image.open(io.BytesIO(base64.b64decode(b64))) for alt, b64 in found}


def test_html_has_the_run_facts_plots_and_escapes_user_text(sets):
    synthetic, fewshot = sets
    zero_shot = {**CLASSIFIER, "train_on": "real", "epochs": 0, "best_epoch": 0, "history": CLASSIFIER["history"][:1]}
    results = [*RESULTS, {"setting": "zero-shot", "metrics": _metrics(0.25), "classifier": zero_shot}]
    page = report.render_html("Run <1>", results, synthetic, fewshot, extra={"model": "<b>x</b>"}, run=RUN)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>x</b>" not in page and "Run &lt;1&gt;" in page and "s3://bucket/&lt;flowers&gt;" in page
    for label, value in [("dataset", "s3://bucket/&lt;flowers&gt;"),
                         ("adaptation", "class-wise: one SD LoRA per class"), ("shots per class", "16"),
                         ("seed", "1"), ("code (git sha)", "0123abc")]:
        assert re.search(rf"<th>{re.escape(label)}</th><td class=\"text\">{re.escape(value)}</td>", page), label
    assert '<td class="text promoted">promoted: test_top1 0.8125 beats champion version 1</td>' in page
    for r in results:
        assert html.escape(r["setting"]) in page and f"{100 * r['metrics']['top1']:.1f}%" in page
    assert "<td>2 / 75.0%</td>" in page  # best epoch / its val top-1, from history
    assert "<td>nothing (zero-shot)</td><td>0 / 30.0%</td>" in page  # not "real": it never trained
    assert "<td>30 (1 rejected)</td>" in page
    assert "http" not in page and "<link" not in page  # nothing fetched from elsewhere

    images = _images(page)  # one confusion matrix per setting with one, the per-class plot, the samples
    assert set(images) == {"confusion matrix: DataDream <dataset>", "per-class accuracy", "sample grid"}
    assert images["sample grid"].size == report.sample_grid(synthetic, fewshot_dir=fewshot).size
    assert all(im.format == "PNG" and im.width > 300 for im in images.values())
    # Without a run, the facts still show, as "–"; without a gate the row says so.
    bare = report.render_html("Run", RESULTS[1:])
    assert '<th>registry gate</th><td class="text">–</td>' in bare and "<img" in bare  # per-class plot only


def test_write_report_is_readable_by_all_and_local_reports_get_html_names(tmp_path):
    run = tmp_path / "datadream-2026"
    for task in ("summarize", "for-loop-2/evaluate", "for-loop-2/evaluate-2"):
        report.write_report(run / task / "report", f"<p>{task}</p>")
    assert (run / "summarize" / "report").stat().st_mode & 0o777 == 0o644
    (run / "fewshot" / "report").mkdir(parents=True)  # a folder of that name is left alone
    assert report.publish_local_reports(run) == run / "report.html"
    assert (run / "report.html").read_text() == "<p>summarize</p>"
    copies = sorted(p.relative_to(run).as_posix() for p in run.glob("**/report.html"))
    assert copies == ["for-loop-2/evaluate-2/report.html", "for-loop-2/evaluate/report.html", "report.html",
                      "summarize/report.html"]
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in run.glob("**/report.html"))
    assert report.publish_local_reports(tmp_path / "empty") is None


def test_run_facts_come_from_the_fewshot_set(tmp_path, monkeypatch):
    from datadream.io import atomic_write_json

    monkeypatch.setenv("DATADREAM_GIT_SHA", "0123abc")
    atomic_write_json(tmp_path / "fewshot.json", {"dataset": "/data/flowers", "shots": 16, "seed": 3, "classes": 102})
    assert report.run_facts(tmp_path, mode="dataset", gate=None) == {
        "dataset": "/data/flowers", "shots": 16, "seed": 3, "git_sha": "0123abc", "mode": "dataset"}
    assert report.run_facts(None, mode="class") == {"git_sha": "0123abc", "mode": "class"}
