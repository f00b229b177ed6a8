"""Run report: one self-contained HTML page for the Kubeflow UI's artifact viewer, MLflow and a browser.

The page (templates/report.html.j2, rendered with jinja2) holds the run's facts (dataset, adaptation
mode, shots, seed, git sha, the registry gate's decision), a results table (one row per setting),
per-class accuracy as a table and a plot, each setting's confusion matrix, a grid of synthetic samples
beside real shots, and free-form run parameters. Everything is inline — images are base64 PNG data
URIs — because the Kubeflow UI renders the artifact alone, with no way to fetch anything else. Class
names come from users: the template autoescapes every piece of text.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from datadream.artifacts import FEWSHOT_MARKER
from datadream.data.images import ImageRejected, load_rgb
from datadream.data.manifest import ClassInfo, Record, read_classes, read_manifest, verify_records
from datadream.errors import UserError
from datadream.io import atomic_write_text

log = logging.getLogger(__name__)

MAX_CLASSES = 64  # rows in the sample grid; the rest are summarised in one line
MAX_CONFUSION = 32  # classes beyond which a confusion matrix also gets a list of the top confusions
SHOTS = 2  # real few-shot images shown per row when a few-shot set is given
LABEL_WIDTH, PAD, SEPARATOR, NOTE_HEIGHT = 128, 2, 10, 20  # grid geometry in pixels


# ---------------------------------------------------------------------------------------------- inputs

def _first_images(manifest: Path, folder: Path, slugs: list[str], n: int) -> dict[str, list[str]]:
    """The first `n` image paths per class: from the manifest by index, else from `<slug>/*.png` by name."""
    if manifest.is_file():
        # Only the images shown are checked (confined to the set, regular, hash as recorded), not all of them.
        records: list[Record] = sorted(read_manifest(manifest, verify=False), key=lambda r: r.extra.get("index", 0))
        shown = {s: [r for r in records if r.cls == s][:n] for s in slugs}
        return {s: [r.path if _checked(manifest, r) else "" for r in rs] for s, rs in shown.items()}
    return {s: [str(p) for p in sorted((folder / s).glob("*.png"))[:n]] for s in slugs}


def _checked(manifest: Path, r: Record) -> bool:
    """Whether a record may be shown; one that fails (outside the set, changed, not a file) is a placeholder."""
    try:
        verify_records(manifest, [r])
        return True
    except UserError as e:
        log.warning("report: not showing %s", e)
        return False


def _thumbnail(path: str, size: int) -> Image.Image:
    try:
        return ImageOps.fit(load_rgb(path), (size, size))
    except ImageRejected as e:
        log.warning("report: skipping unreadable sample %s", e)
        return Image.new("RGB", (size, size), (200, 200, 200))


# ------------------------------------------------------------------------------------------------ grid

def sample_grid(synthetic_dir: str | os.PathLike, classes: list[ClassInfo] | None = None, per_class: int = 8,
                thumb: int = 64, fewshot_dir: str | os.PathLike | None = None,
                max_classes: int = MAX_CLASSES, shots: int = SHOTS) -> Image.Image:
    """One row per class: its display name, up to `shots` real shots (with `fewshot_dir`), a separator,
    then the first `per_class` synthetic images by index. Missing images leave blank cells."""
    synthetic_dir = Path(synthetic_dir)
    classes = classes if classes is not None else read_classes(synthetic_dir / "classes.json")
    shown, hidden = classes[:max_classes], max(0, len(classes) - max_classes)
    slugs = [c.slug for c in shown]
    synthetic = _first_images(synthetic_dir / "manifest.jsonl", synthetic_dir, slugs, per_class)
    shots = shots if fewshot_dir is not None else 0
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


def _label(draw: ImageDraw.ImageDraw, font, text: str, xy: tuple[int, int], width: int) -> None:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-3] + ".." if len(text) > 3 else ""
    draw.text(xy, text, fill="black", font=font)


def near_copy_grid(pairs: list[dict], thumb: int = 96, columns: int = 3) -> Image.Image:
    """Each near copy beside the real shot it copies, captioned with the class and the cosine similarity;
    `pairs` are {"image", "shot" (paths), "class", "similarity"[, "dropped"]}."""
    cell_w, cell_h = 2 * thumb + 3 * PAD + SEPARATOR, thumb + NOTE_HEIGHT + 2 * PAD
    rows = (len(pairs) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell_w, max(1, rows) * cell_h), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for n, p in enumerate(pairs):
        x, y = (n % columns) * cell_w + PAD, (n // columns) * cell_h + PAD
        grid.paste(_thumbnail(p["image"], thumb), (x, y))
        grid.paste(_thumbnail(p["shot"], thumb), (x + thumb + PAD, y))
        note = f"{p['class']} cos {p['similarity']:.3f}" + (" (dropped)" if p.get("dropped") else "")
        _label(draw, font, note, (x, y + thumb + 3), 2 * thumb)
    return grid


def _quality(synthetic_dir: str | os.PathLike | None, fewshot_dir: str | os.PathLike | None,
             worst: int = 5, max_pairs: int = 12) -> dict | None:
    """The synthetic set's quality (quality.json): overall figures, the `worst` classes by class agreement
    (a grid of their images beside their real shots) and the near copies beside the shots they copy."""
    from datadream import quality

    report = quality.read_report(synthetic_dir) if synthetic_dir is not None else None
    if report is None:
        return None
    synthetic_dir = Path(synthetic_dir)
    o = report["overall"]

    def num(x, fmt="{:.3f}"):
        return "–" if x is None else fmt.format(x)

    overall = [("class agreement", _pct(o["class_agreement"])), ("CLIPScore", num(o["clip_score"], "{:.2f}")),
               ("diversity (real shots)", f"{num(o['diversity'])} ({num(o['real_diversity'])})"),
               ("near copies", _pct(o["near_copies"])), ("FD (CLIP) to val", num(o["fd_clip"], "{:.4f}")),
               ("precision / recall (k=3)", f"{num(o['precision'])} / {num(o['recall'])}"),
               ("images", str(o["images"]))]
    if o.get("dropped"):
        overall.append(("dropped by the filter", ", ".join(f"{k} {v}" for k, v in o["dropped"].items())))
    by_name = sorted(report["classes"].items(), key=lambda kv: (kv[1]["class_agreement"], kv[0]))[:worst]
    rows = [[name, _pct(e["class_agreement"]), f"{e['clip_score']:.2f}", num(e["diversity"]),
             num(e["real_diversity"]), _pct(e["near_copies"]),
             ", ".join(f"{k} {v}" for k, v in sorted(e["assigned_elsewhere"].items(), key=lambda kv: -kv[1])[:3])
             or "–"] for name, e in by_name]
    classes = {c.slug: c for c in read_classes(synthetic_dir / "classes.json")}
    grid = sample_grid(synthetic_dir, [classes[e["slug"]] for _, e in by_name], fewshot_dir=fewshot_dir, shots=4,
                       per_class=min(8, max(e["images"] for _, e in by_name)))

    def shot(path: str) -> str:
        return path if Path(path).is_absolute() or fewshot_dir is None else str(Path(fewshot_dir) / path)

    pairs = [{"image": str(synthetic_dir / c["image"]), "shot": shot(c["shot"]), "class": name,
              "similarity": c["similarity"]} for name, e in report["classes"].items() for c in e["near_copy_images"]]
    dropped = synthetic_dir / quality.DROPPED
    if dropped.is_file():
        names = {c.slug: c.name for c in classes.values()}
        pairs += [{"image": str(synthetic_dir / d["path"]), "shot": shot(d["shot"]), "class": names[d["class"]],
                   "similarity": d["similarity"], "dropped": True}
                  for d in map(json.loads, dropped.read_text().splitlines()) if d["reason"] == "near_copy"]
    pairs.sort(key=lambda p: -p["similarity"])
    return {"overall": overall, "threshold": report["copy_threshold"],
            "header": ["class", "class agreement", "CLIPScore", "diversity", "real diversity", "near copies",
                       "assigned instead"],
            "rows": rows, "grid": _data_uri(grid), "near_copies": len(pairs),
            "pairs": _data_uri(near_copy_grid(pairs[:max_pairs])) if pairs and fewshot_dir is not None else None}


def _data_uri(image: Image.Image) -> str:
    # A 256-colour palette halves the PNG (64 classes × 10 thumbnails: ~5 MB → ~2 MB) at little cost at this size.
    buf = io.BytesIO()
    image.quantize(256).save(buf, format="PNG", optimize=True)
    log.info("report: sample grid %dx%d, %.0f KiB PNG", *image.size, len(buf.getvalue()) / 1024)
    return _png_uri(buf.getvalue())


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ------------------------------------------------------------------------------------------- contents

# The run's facts at the top of the page: (key in `run`, label); the first six are always shown.
RUN_FACTS = [("dataset", "dataset"), ("mode", "adaptation"), ("shots", "shots per class"), ("seed", "seed"),
             ("git_sha", "code (git sha)"), ("gate", "registry gate"), ("classifier_version", "registered classifier"),
             ("kfp_run_id", "KFP run"), ("mlflow_run_id", "MLflow run")]
_ALWAYS = 6
MODES = {"class": "class-wise: one SD LoRA per class", "dataset": "dataset-wise: one SD LoRA for all classes"}


def run_facts(fewshot_dir: str | os.PathLike | None = None, **facts: Any) -> dict[str, Any]:
    """The `run` of `render_html`: dataset, shots and seed from the few-shot set's fewshot.json, the
    code's git sha, then `facts` (mode, gate, kfp_run_id, …; None values are left out)."""
    from datadream.tracking import code_version

    out: dict[str, Any] = {}
    marker = Path(fewshot_dir) / FEWSHOT_MARKER if fewshot_dir is not None else None
    if marker is not None and marker.is_file():
        summary = json.loads(marker.read_text(encoding="utf-8"))
        out.update({k: summary.get(k) for k in ("dataset", "shots", "seed")})
    out["git_sha"] = code_version()
    out.update(facts)
    return {k: v for k, v in out.items() if v is not None}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _trained_on(clf: dict | None) -> str:
    if not clf:
        return "–"
    if clf.get("epochs") == 0:  # the zero-shot head: classify ran no epoch
        return "nothing (zero-shot)"
    return str(clf.get("train_on", "–"))


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


def _facts(run: dict | None) -> list[tuple[str, str, str]]:
    """(label, value, css class) rows; a gate decision is coloured by its first word."""
    run = run or {}
    rows = []
    for i, (key, label) in enumerate(RUN_FACTS):
        value = run.get(key)
        if value in (None, "") and i >= _ALWAYS:
            continue
        text = "–" if value in (None, "") else MODES.get(value, str(value)) if key == "mode" else str(value)
        css = text.split(":")[0].replace(" ", "_") if key == "gate" else ""
        rows.append((label, text, css if css in ("promoted", "not_promoted") else ""))
    return rows


def _summary(results: list[dict]) -> dict:
    rows = []
    for r in results:
        m, clf = r["metrics"], r.get("classifier")
        n = f"{m.get('n', '–')}" + (f" ({m['rejected']} rejected)" if m.get("rejected") else "")
        rows.append([r["setting"], _pct(m.get("top1")), _pct(m.get("top5")), _pct(m.get("mean_per_class")), n,
                     _trained_on(clf), _best(clf)])
    k = results[0]["metrics"].get("top5_k", 5) if results else 5
    return {"header": ["setting", "top-1", f"top-{k}", "mean per-class", "test images", "trained on",
                       "best epoch / val top-1"], "rows": rows}


def _slugs(results: list[dict]) -> list[str]:
    return list(dict.fromkeys(s for r in results for s in r["metrics"].get("per_class", {})))


def _per_class(results: list[dict], names: dict[str, str]) -> dict:
    first_n = results[0]["metrics"].get("per_class_n", {}) if results else {}
    return {"header": ["class", "test images", *(r["setting"] for r in results)],
            "rows": [[names.get(s, s), str(first_n.get(s, "–")),
                      *(_pct(r["metrics"].get("per_class", {}).get(s)) for r in results)] for s in _slugs(results)]}


def _top_confusions(labels: list[str], counts: list[list[int]], n: int = 20) -> list[tuple[str, str, int]]:
    pairs = sorted(((c, i, j) for i, row in enumerate(counts) for j, c in enumerate(row) if i != j and c),
                   reverse=True)[:n]
    return [(labels[i], labels[j], c) for c, i, j in pairs]


def _plots(results: list[dict], names: dict[str, str]) -> tuple[str | None, list[dict]]:
    """The per-class accuracy plot and one confusion matrix per setting, as PNG data URIs."""
    from datadream import plots

    slugs = _slugs(results)
    per_class = None
    if slugs:
        per_class = _png_uri(plots.png_bytes(plots.per_class_accuracy(
            [names.get(s, s) for s in slugs],
            {r["setting"]: [r["metrics"].get("per_class", {}).get(s) for s in slugs] for r in results})))
    confusions = []
    for r in results:
        m = r["metrics"]
        if not m.get("confusion") or not m.get("classes"):
            continue
        labels = [names.get(s, s) for s in m["classes"]]
        figure = plots.confusion_matrix(labels, m["confusion"], f"Confusion matrix: {r['setting']}")
        image = _png_uri(plots.png_bytes(figure))
        top = _top_confusions(labels, m["confusion"]) if len(labels) > MAX_CONFUSION else []
        confusions.append({"setting": r["setting"], "image": image, "top": top})
    return per_class, confusions


def _extra_rows(extra: dict | None) -> list[tuple[str, str]]:
    return [(str(k), v if isinstance(v, str) else json.dumps(v, default=str)) for k, v in (extra or {}).items()]


# ------------------------------------------------------------------------------------------ rendering

def render_html(title: str, results: list[dict], synthetic_dir: str | os.PathLike | None = None,
                fewshot_dir: str | os.PathLike | None = None, extra: dict | None = None,
                run: dict | None = None) -> str:
    """The report as one HTML page.

    `results`: one {"setting": label, "metrics": metrics.json, "classifier": classifier.json or None}
    per classifier. `run`: the run's facts by RUN_FACTS key (dataset, mode, shots, seed, git_sha, gate,
    …). `synthetic_dir` (+ `fewshot_dir` for the real shots): the sample grid. `extra`: free-form
    parameters shown last.
    """
    import jinja2

    names = _class_names(results, synthetic_dir, fewshot_dir)
    per_class_plot, confusions = _plots(results, names)
    samples = None
    if synthetic_dir is not None:
        note = ("Real shots, then synthetic images, per class." if fewshot_dir is not None
                else "Synthetic images per class.")
        samples = {"note": note, "image": _data_uri(sample_grid(synthetic_dir, fewshot_dir=fewshot_dir))}
    env = jinja2.Environment(loader=jinja2.PackageLoader("datadream", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template("report.html.j2").render(
        title=title, facts=_facts(run), summary=_summary(results), per_class=_per_class(results, names),
        per_class_plot=per_class_plot, confusions=confusions, samples=samples, extra=_extra_rows(extra),
        quality=_quality(synthetic_dir, fewshot_dir),
        k=results[0]["metrics"].get("top5_k", 5) if results else 5)


def write_report(path: str | os.PathLike, html: str) -> None:
    """Write the report atomically (the UI never shows half a page), readable by all (0644 under umask 022)."""
    atomic_write_text(path, html)


def publish_local_reports(run_dir: str | os.PathLike) -> Path | None:
    """After a kfp.local run: give every HTML report artifact (a file named `report`, which a browser
    would show as source) a `report.html` copy beside it, and the run's summary report a copy at
    `<run_dir>/report.html`, all 0644. Returns that path (None when the run has no summary report)."""
    run_dir = Path(run_dir)
    summary = None
    for artifact in sorted(run_dir.glob("**/report")):
        if not artifact.is_file():
            continue
        copy = artifact.with_name("report.html")
        shutil.copyfile(artifact, copy)
        copy.chmod(0o644)
        if artifact.parent.name.startswith("summarize"):
            summary = copy
    if summary is None:
        return None
    shutil.copyfile(summary, run_dir / "report.html")
    (run_dir / "report.html").chmod(0o644)
    return run_dir / "report.html"
