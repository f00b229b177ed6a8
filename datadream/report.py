"""Run report: one self-contained HTML or Markdown page for the Kubeflow UI's artifact viewer.

The page holds a results table (one row per setting), per-class accuracy, the first setting's
confusion matrix, a grid of synthetic samples (beside real shots) and free-form run parameters.
Everything is inline — the grid is a base64 PNG data URI, styles are attributes — because the UI
renders the artifact alone, with no way to fetch anything else. Class names come from users, so
every piece of text is escaped.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from datadream.data.images import ImageRejected, load_rgb
from datadream.data.manifest import ClassInfo, Record, read_classes, read_manifest
from datadream.io import atomic_write_text, read_json

log = logging.getLogger(__name__)

MAX_CLASSES = 64  # rows in the sample grid; the rest are summarised in one line
MAX_CONFUSION = 32  # classes beyond which the confusion matrix becomes a list of the top confusions
SHOTS = 2  # real few-shot images shown per row when a few-shot set is given
LABEL_WIDTH, PAD, SEPARATOR, NOTE_HEIGHT = 128, 2, 10, 20  # grid geometry in pixels


# ---------------------------------------------------------------------------------------------- inputs

def load_result(setting: str, evaluate_dir: str | os.PathLike, classifier_dir: str | os.PathLike | None = None) -> dict:
    """A result dict for `render_*` from an evaluate output folder (and optionally its classify folder)."""
    evaluate_dir = Path(evaluate_dir)
    classifier = read_json(Path(classifier_dir) / "classifier.json") if classifier_dir is not None else None
    result: dict[str, Any] = {"setting": setting, "metrics": read_json(evaluate_dir / "metrics.json"),
                              "classifier": classifier}
    if (evaluate_dir / "confusion.csv").is_file():
        rows = list(csv.reader(io.StringIO((evaluate_dir / "confusion.csv").read_text(encoding="utf-8"))))
        result["confusion"] = {"classes": rows[0][1:], "counts": [[int(v) for v in r[1:]] for r in rows[1:]]}
    return result


def _first_images(manifest: Path, folder: Path, slugs: list[str], n: int) -> dict[str, list[str]]:
    """The first `n` image paths per class: from the manifest by index, else from `<slug>/*.png` by name."""
    if manifest.is_file():
        records: list[Record] = sorted(read_manifest(manifest), key=lambda r: r.extra.get("index", 0))
        return {s: [r.path for r in records if r.cls == s][:n] for s in slugs}
    return {s: [str(p) for p in sorted((folder / s).glob("*.png"))[:n]] for s in slugs}


def _thumbnail(path: str, size: int) -> Image.Image:
    try:
        return ImageOps.fit(load_rgb(path), (size, size))
    except ImageRejected as e:
        log.warning("report: skipping unreadable sample %s", e)
        return Image.new("RGB", (size, size), (200, 200, 200))


# ------------------------------------------------------------------------------------------------ grid

def sample_grid(synthetic_dir: str | os.PathLike, classes: list[ClassInfo] | None = None, per_class: int = 8,
                thumb: int = 64, fewshot_dir: str | os.PathLike | None = None,
                max_classes: int = MAX_CLASSES) -> Image.Image:
    """One row per class: its display name, up to SHOTS real shots (with `fewshot_dir`), a separator,
    then the first `per_class` synthetic images by index. Missing images leave blank cells."""
    synthetic_dir = Path(synthetic_dir)
    classes = classes if classes is not None else read_classes(synthetic_dir / "classes.json")
    shown, hidden = classes[:max_classes], max(0, len(classes) - max_classes)
    slugs = [c.slug for c in shown]
    synthetic = _first_images(synthetic_dir / "manifest.jsonl", synthetic_dir, slugs, per_class)
    shots = SHOTS if fewshot_dir is not None else 0
    real = _first_images(Path(fewshot_dir) / "train.jsonl", Path(fewshot_dir), slugs, shots) if shots else {}

    cell = thumb + PAD
    synth_x = LABEL_WIDTH + shots * cell + (SEPARATOR if shots else 0)
    width = synth_x + per_class * cell + PAD
    height = PAD + len(shown) * cell + (NOTE_HEIGHT if hidden else 0)
    grid = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for row, c in enumerate(shown):
        y = PAD + row * cell
        label = c.name
        while label and draw.textlength(label, font=font) > LABEL_WIDTH - 8:
            label = label[:-3] + ".." if len(label) > 3 else ""
        top, bottom = draw.textbbox((0, 0), label, font=font)[1::2]
        draw.text((4, y + (thumb - (bottom - top)) // 2 - top), label, fill="black", font=font)
        for i, path in enumerate(real.get(c.slug, [])):
            grid.paste(_thumbnail(path, thumb), (LABEL_WIDTH + i * cell, y))
        for i, path in enumerate(synthetic[c.slug]):
            grid.paste(_thumbnail(path, thumb), (synth_x + i * cell, y))
    if shots:
        x = synth_x - SEPARATOR // 2 - 1
        draw.line([(x, 0), (x, PAD + len(shown) * cell)], fill=(60, 60, 60), width=2)
    if hidden:
        draw.text((4, height - NOTE_HEIGHT + 4), f"... and {hidden} more class(es)", fill="black", font=font)
    return grid


def confusion_image(labels: list[str], counts: list[list[int]], cell: int = 28) -> Image.Image:
    """The confusion matrix as a picture: rows = true class, columns = predicted, shaded by the row's
    share (blue); counts are printed in the cells. Rows are labelled "i name", columns by the index i.
    Beyond MAX_CONFUSION classes cells shrink to a few pixels and lose their numbers (a heat map)."""
    n = len(labels)
    big = n > MAX_CONFUSION
    cell = max(2, min(cell, 1200 // max(n, 1))) if big else cell
    font = ImageFont.load_default()
    names = [f"{i} {lab}" for i, lab in enumerate(labels)]
    label_w = 0 if big else min(LABEL_WIDTH * 2, 8 + max((int(font.getlength(t)) for t in names), default=0))
    top = 0 if big else 16
    image = Image.new("RGB", (label_w + n * cell + PAD, top + n * cell + PAD), "white")
    draw = ImageDraw.Draw(image)
    for i, row in enumerate(counts):
        total = sum(row) or 1
        y = top + i * cell
        if not big:
            draw.text((4, y + cell // 2 - 6), names[i][:40], fill="black", font=font)
        for j, c in enumerate(row):
            share = c / total
            fill = tuple(round(255 - share * (255 - v)) for v in (31, 119, 180))
            x = label_w + j * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fill, outline=None if big else (220, 220, 220))
            if not big and c:
                draw.text((x + 3, y + cell // 2 - 6), str(c), fill="white" if share > 0.5 else "black", font=font)
    if not big:
        for j in range(n):
            draw.text((label_w + j * cell + 3, 2), str(j), fill="black", font=font)
    return image


def _data_uri(image: Image.Image) -> str:
    # A 256-colour palette halves the PNG (64 classes × 10 thumbnails: ~5 MB → ~2 MB) at little cost at this size.
    buf = io.BytesIO()
    image.quantize(256).save(buf, format="PNG", optimize=True)
    log.info("report: sample grid %dx%d, %.0f KiB PNG", *image.size, len(buf.getvalue()) / 1024)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------------- table contents

def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _best(clf: dict | None) -> str:
    if not clf:
        return "–"
    val = clf.get("best_val_top1")
    if val is None:
        val = next((h.get("val_top1") for h in clf.get("history", []) if h.get("epoch") == clf.get("best_epoch")), None)
    return f"{clf.get('best_epoch', '–')} / {_pct(val)}"


def _class_names(results: list[dict], *dirs: str | os.PathLike | None) -> dict[str, str]:
    for r in results:
        if r.get("classifier") and r["classifier"].get("classes"):
            return {c["slug"]: c["name"] for c in r["classifier"]["classes"]}
    for d in dirs:
        if d is not None and (Path(d) / "classes.json").is_file():
            return {c.slug: c.name for c in read_classes(Path(d) / "classes.json")}
    return {}


def _tables(results: list[dict], names: dict[str, str]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(heading, header, rows) for each table; cells are plain text, escaped by the renderer."""
    summary = []
    for r in results:
        m, clf = r["metrics"], r.get("classifier")
        n = f"{m.get('n', '–')}" + (f" ({m['rejected']} rejected)" if m.get("rejected") else "")
        summary.append([r["setting"], _pct(m.get("top1")), _pct(m.get("top5")), _pct(m.get("mean_per_class")), n,
                        (clf or {}).get("train_on", "–"), _best(clf)])
    k = results[0]["metrics"].get("top5_k", 5) if results else 5
    tables = [("Results", ["setting", "top-1", f"top-{k}", "mean per-class", "test images", "trained on",
                           "best epoch / val top-1"], summary)]
    slugs = list(dict.fromkeys(s for r in results for s in r["metrics"].get("per_class", {})))
    first_n = results[0]["metrics"].get("per_class_n", {}) if results else {}
    tables.append(("Per-class accuracy", ["class", "test images", *(r["setting"] for r in results)],
                   [[names.get(s, s), str(first_n.get(s, "–")),
                     *(_pct(r["metrics"].get("per_class", {}).get(s)) for r in results)] for s in slugs]))
    return tables


def _confusion(result: dict, names: dict[str, str]) -> tuple[list[str], list[list[int]]] | None:
    conf = result.get("confusion")
    return ([names.get(s, s) for s in conf["classes"]], conf["counts"]) if conf else None


def _top_confusions(labels: list[str], counts: list[list[int]], n: int = 20) -> list[list[str]]:
    pairs = sorted(((c, i, j) for i, row in enumerate(counts) for j, c in enumerate(row) if i != j and c),
                   reverse=True)[:n]
    return [[labels[i], labels[j], str(c)] for c, i, j in pairs]


# ------------------------------------------------------------------------------------------ rendering

def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _html_confusion(labels: list[str], counts: list[list[int]]) -> str:
    if len(labels) > MAX_CONFUSION:
        return (f"<p>{len(labels)} classes: the most frequent confusions instead of the full matrix.</p>"
                + _html_table(["true", "predicted", "count"], _top_confusions(labels, counts)))
    head = "".join(f"<th>{html.escape(lab)}</th>" for lab in labels)
    rows = []
    for lab, row in zip(labels, counts, strict=True):
        total = sum(row) or 1
        cells = "".join(f'<td style="background:rgba(31,119,180,{c / total:.2f})">{c}</td>' for c in row)
        rows.append(f"<tr><th>{html.escape(lab)}</th>{cells}</tr>")
    return f"<table><tr><th>true \\ predicted</th>{head}</tr>{''.join(rows)}</table>"


_STYLE = ("body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin:.5em 0 1.5em}"
          "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f4f4f4}")


def _extra_rows(extra: dict | None) -> list[list[str]]:
    return [[str(k), v if isinstance(v, str) else json.dumps(v, default=str)] for k, v in (extra or {}).items()]


def render_html(title: str, results: list[dict], synthetic_dir: str | os.PathLike | None = None,
                fewshot_dir: str | os.PathLike | None = None, extra: dict | None = None) -> str:
    """The report as one HTML page; `results` are {"setting", "metrics", "classifier"[, "confusion"]}."""
    names = _class_names(results, synthetic_dir, fewshot_dir)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for heading, header, rows in _tables(results, names):
        parts.append(f"<h2>{html.escape(heading)}</h2>{_html_table(header, rows)}")
    if results and (conf := _confusion(results[0], names)):
        parts.append(f"<h2>Confusion matrix: {html.escape(results[0]['setting'])}</h2>{_html_confusion(*conf)}")
    if synthetic_dir is not None:
        uri = _data_uri(sample_grid(synthetic_dir, fewshot_dir=fewshot_dir))
        note = "real shots, then synthetic images" if fewshot_dir is not None else "synthetic images"
        parts.append(f"<h2>Samples</h2><p>{note}</p><img alt='sample grid' src='{uri}'>")
    if extra:
        parts.append(f"<h2>Run parameters</h2>{_html_table(['parameter', 'value'], _extra_rows(extra))}")
    return "\n".join([*parts, "</body></html>"])


def _md(text: str) -> str:
    """Inline Markdown text that can neither inject HTML nor break a table cell."""
    text = html.escape(" ".join(str(text).split())).replace("|", "&#124;")
    return re.sub(r"([\\`*_\[\]])", r"\\\1", text)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(map(_md, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows])


def render_markdown(title: str, results: list[dict], synthetic_dir: str | os.PathLike | None = None,
                    fewshot_dir: str | os.PathLike | None = None, extra: dict | None = None) -> str:
    """The same report as Markdown (the confusion matrix without shading)."""
    names = _class_names(results, synthetic_dir, fewshot_dir)
    parts = [f"# {_md(title)}"]
    for heading, header, rows in _tables(results, names):
        parts.append(f"## {heading}\n\n{_md_table(header, rows)}")
    if results and (conf := _confusion(results[0], names)):
        labels, counts = conf
        if len(labels) > MAX_CONFUSION:
            body = _md_table(["true", "predicted", "count"], _top_confusions(labels, counts))
        else:
            body = _md_table(["true \\ predicted", *labels],
                             [[lab, *map(str, row)] for lab, row in zip(labels, counts, strict=True)])
        parts.append(f"## Confusion matrix: {_md(results[0]['setting'])}\n\n{body}")
    if synthetic_dir is not None:
        parts.append(f"## Samples\n\n![sample grid]({_data_uri(sample_grid(synthetic_dir, fewshot_dir=fewshot_dir))})")
    if extra:
        parts.append(f"## Run parameters\n\n{_md_table(['parameter', 'value'], _extra_rows(extra))}")
    return "\n\n".join(parts) + "\n"


def write_report(path: str | os.PathLike, html_or_markdown: str) -> None:
    """Write the report atomically, so the UI never shows half a page."""
    atomic_write_text(path, html_or_markdown)
    log.info("report: wrote %s (%.0f KiB)", path, len(html_or_markdown.encode("utf-8")) / 1024)
