"""Showing the synthetic set's quality: the run report's section (worst classes, near copies)."""

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from datadream import quality
from datadream.data.manifest import read_classes, read_manifest
from datadream.io import mark_started
from datadream.report import render_html
from datadream.stages import adapt, generate

FAST = ("adapt.mode=dataset", "adapt.max_steps=2", "generate.images_per_class=4", "generate.steps=2",
        "generate.batch_size=4", "assess.copy_threshold=0.9999")  # the random tiny CLIP: only exact copies


@pytest.fixture(scope="module")
def planted(tmp_path_factory, fewshot_set, tiny):
    """Two classes; the second holds an exact copy of one of its shots at index 2."""
    root = tmp_path_factory.mktemp("qt")
    adapters = adapt.run(tiny(*FAST), fewshot_set, root / "ad")
    classes = read_classes(fewshot_set / "classes.json")[0::3]
    out = root / "syn"
    shot = next(r for r in read_manifest(fewshot_set / "train.jsonl") if r.cls == classes[1].slug)
    (out / classes[1].slug).mkdir(parents=True)
    Image.open(shot.path).convert("RGB").save(out / classes[1].slug / "00002.png")
    mark_started(out, generate.fingerprint_of(tiny(*FAST), adapt.read_index(adapters), classes))
    return generate.run(tiny(*FAST), fewshot_set, adapters, out, shard="0/3"), classes, shot


def test_report_shows_the_worst_classes_and_the_near_copies(planted, fewshot_set):
    out = planted[0]
    report = json.loads((out / quality.REPORT).read_text())
    html = render_html("run", [], synthetic_dir=out, fewshot_dir=fewshot_set)
    section = html[html.index("<h2>Synthetic set quality</h2>"):]
    # The classes' rows, lowest class agreement first, with their figures as in quality.json.
    rows = re.findall(r"<tr><td class=\"text\">([^<]+)</td><td>([\d.]+)%</td>", section)
    expected = sorted(report["classes"].items(), key=lambda kv: (kv[1]["class_agreement"], kv[0]))
    assert [(n, float(p)) for n, p in rows] == [(n, round(100 * e["class_agreement"], 1)) for n, e in expected]
    assert "1 synthetic image(s) (left of each pair) beside the shot they copy" in section
    assert section.count("src=\"data:image/png;base64,") == 2  # worst-classes grid, near-copy pairs
    assert f"{100 * report['overall']['class_agreement']:.1f}%" in section

    # Without quality.json (assess off) there is no section.
    (out / quality.REPORT).rename(out / "q.json")
    try:
        assert "Synthetic set quality" not in render_html("run", [], synthetic_dir=out, fewshot_dir=fewshot_set)
    finally:
        (out / "q.json").rename(out / quality.REPORT)


def test_near_copy_pairs_image_puts_the_copy_beside_its_shot(planted):
    from datadream.report import near_copy_grid

    out, classes, shot = planted
    [pair] = json.loads((out / quality.REPORT).read_text())["classes"][classes[1].name]["near_copy_images"]
    grid = near_copy_grid([{"image": str(out / pair["image"]), "shot": shot.path, "class": classes[1].name,
                            "similarity": pair["similarity"]}], thumb=32)
    left, right = grid.crop((2, 2, 34, 34)), grid.crop((36, 2, 68, 34))
    assert list(left.getdata()) == list(right.getdata())  # the copy and its shot, pixel for pixel
    assert Path(out / pair["image"]).name == "00002.png"


def test_gather_step_tracks_quality_on_its_run_the_parent_and_kfp_metrics(planted, tmp_path):
    """The gather component, called as KFP calls it: the gather run holds the overall figures, the per-class
    table and quality.json; the pipeline's parent run the two figures its runs table compares; and the
    step's KFP Metrics the overall figures."""
    import mlflow
    from kfp.dsl import Dataset, Metrics
    from mlflow import MlflowClient

    from components import stages as components
    from datadream import tracking

    parent = tracking.start_pipeline_run("quality-test", {"kfp.run_id": "q1"})
    metrics = Metrics(uri=str(tmp_path / "metrics"))
    components.gather(shards=[Dataset(uri=str(planted[0]))], mlflow_run=parent,
                      synthetic=Dataset(uri=str(tmp_path / "gathered")), quality=metrics)
    report = json.loads((tmp_path / "gathered" / quality.REPORT).read_text())
    o = report["overall"]
    client = MlflowClient()
    [child] = client.search_runs([client.get_run(parent).info.experiment_id],
                                 f"tags.mlflow.parentRunId = '{parent}'")
    assert child.data.tags["datadream.stage"] == "gather"
    assert child.data.metrics == pytest.approx({k: float(o[k]) for k in (
        "class_agreement", "clip_score", "diversity", "real_diversity", "near_copies", "fd_clip", "precision",
        "recall", "images")})
    assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"quality_per_class.json", "quality.json"}
    table = mlflow.artifacts.load_dict(f"runs:/{child.info.run_id}/quality_per_class.json")
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert sorted(r["class"] for r in rows) == sorted(report["classes"])
    assert all(r["near_copies"] == report["classes"][r["class"]]["near_copies"] for r in rows)
    assert client.get_run(parent).data.metrics == {"synthetic_class_agreement": o["class_agreement"],
                                                   "synthetic_fd_clip": o["fd_clip"]}
    assert metrics.metadata == child.data.metrics
