"""Stage 4: score a classifier from the classify stage on a test manifest.

Output folder (published whole or not at all):

    confusion.csv   rows = true class, columns = predicted class (by slug), counts
    metrics.json    written last: top-1, top-5 (k = min(5, C)), per-class accuracy, n, rejected

Images that fail to load are counted in metrics["rejected"] and not scored.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from datadream.artifacts import CLASSIFIER_HEAD as HEAD_FILE
from datadream.artifacts import CLASSIFIER_LORA as LORA_FILE
from datadream.artifacts import CLASSIFIER_MARKER as MARKER
from datadream.artifacts import CONFUSION_FILE as CONFUSION
from datadream.artifacts import METRICS_MARKER as METRICS
from datadream.config import ClassifyConfig, Config, ModelsConfig, RunConfig
from datadream.data.images import RejectionCounts
from datadream.data.loading import ImageDataset, collate, eval_transform, read_records
from datadream.data.manifest import ClassInfo, read_manifest
from datadream.errors import UserError
from datadream.io import (
    atomic_write_json,
    check_output_dir,
    read_json,
    sha256_cached,
    sha256_file,
    sha256_json,
    staged_dir,
    writes_output,
)
from datadream.models.clip import add_clip_lora, load_clip, set_lora_state
from datadream.runtime import autocast_ctx, autocast_dtype, resolve_device

log = logging.getLogger(__name__)



@dataclass
class Classifier:
    """A trained CLIP LoRA classifier: the image tower with its adapter, and the stored class head."""

    model: nn.Module
    head: torch.Tensor  # [C, D], L2-normalised class text embeddings
    logit_scale: float
    classes: list[ClassInfo]
    preprocess: dict
    device: torch.device
    amp: torch.dtype | None = None

    def __post_init__(self):
        self.transform = eval_transform(self.preprocess)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits [N, C] (float32, CPU) for a batch already passed through `self.transform`."""
        with autocast_ctx(self.device, self.amp):
            emb = self.model.encode_image(images.to(self.device))
        emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        return (self.logit_scale * emb @ self.head.t()).cpu()

    def predict_proba(self, images: list) -> torch.Tensor:
        """Class probabilities [N, C] for a list of PIL images."""
        if not images:
            return torch.empty(0, len(self.classes))
        batch = torch.stack([self.transform(im.convert("RGB")) for im in images])
        return self.logits(batch).softmax(-1)


def load_classifier(
    classifier_dir: str | Path,
    config_models_override: ModelsConfig | None = None,
    device: str | torch.device | None = None,
) -> Classifier:
    """Load a classify output folder. The base CLIP is the one classifier.json records, unless
    `config_models_override` says where to load it from instead (e.g. a mirror folder or another
    cache_dir); the LoRA must fit it exactly. The text tower is not run: the head is stored."""
    folder = Path(classifier_dir)
    if not (folder / MARKER).is_file():
        raise UserError(f"{folder}: no {MARKER}; not a finished classify output")
    meta = read_json(folder / MARKER)
    try:
        recorded = meta["model"]
        classes = [ClassInfo(int(c["index"]), str(c["slug"]), str(c["name"])) for c in meta["classes"]]
        lora_cfg = meta["lora"]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{folder / MARKER}: missing or malformed field ({e})") from None
    for name, digest in (meta.get("files_sha256") or {}).items():  # older classifier folders lack it
        if not (folder / name).is_file() or sha256_cached(folder / name) != digest:
            raise UserError(f"{folder / name}: missing or changed since classify wrote it (sha256 differs from "
                            f"{MARKER}); re-run classify")
    models = config_models_override or ModelsConfig(
        clip=recorded["clip"], clip_pretrained=recorded["clip_pretrained"]
    )
    if (models.clip, models.clip_pretrained) != (recorded["clip"], recorded["clip_pretrained"]):
        log.warning("evaluate: loading base CLIP %s (%s) for a classifier trained on %s (%s)", models.clip,
                    models.clip_pretrained, recorded["clip"], recorded["clip_pretrained"])
    device = torch.device(device) if device is not None else resolve_device(RunConfig())

    model, _, preprocess = load_clip(models, device)
    model = add_clip_lora(model, ClassifyConfig(rank=lora_cfg["rank"], alpha=lora_cfg["alpha"], dropout=0.0,
                                                targets=lora_cfg["targets"]))
    set_lora_state(model, load_file(folder / LORA_FILE), source=str(folder / LORA_FILE))
    model.to(device).eval()
    head_file = load_file(folder / HEAD_FILE)
    head = head_file["text_embeddings"].float().to(device)
    if head.shape[0] != len(classes):
        raise UserError(f"{folder / HEAD_FILE}: {head.shape[0]} class embeddings for {len(classes)} classes")
    preprocess = meta.get("preprocess", preprocess)  # what it was trained with
    return Classifier(model, head, float(head_file["logit_scale"]), classes, preprocess, device)


def confusion_csv(confusion: torch.Tensor, classes: list[ClassInfo]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["true\\predicted", *(c.slug for c in classes)])
    for c, row in zip(classes, confusion.tolist(), strict=True):
        w.writerow([c.slug, *row])
    return buf.getvalue()


@writes_output("out_dir")
def run(config: Config, classifier_dir: str | Path, manifest_path: str | Path, out_dir: str | Path) -> dict:
    """Score the classifier on the manifest (the few-shot test.jsonl); returns the metrics dict."""
    classifier_dir, manifest_path, out = Path(classifier_dir), Path(manifest_path), Path(out_dir)
    if not manifest_path.is_file():
        raise UserError(f"{manifest_path}: test manifest not found")
    read_manifest(manifest_path)  # every image checked against its recorded sha256 before the model loads
    if not (classifier_dir / MARKER).is_file():
        raise UserError(f"{classifier_dir}: no {MARKER}; not a finished classify output")
    fingerprint = sha256_json({
        "classifier": sha256_file(classifier_dir / MARKER),
        "manifest": sha256_file(manifest_path),
        "max_image_pixels": config.data.max_image_pixels,
    })
    if check_output_dir(out, METRICS, fingerprint):
        log.info("evaluate: %s already holds these metrics; nothing to do", out)
        return read_json(out / METRICS)

    device = resolve_device(config.run)
    clf = load_classifier(classifier_dir, config.models, device)
    clf.amp = autocast_dtype(config.run, device)
    records = read_records(manifest_path, clf.classes, is_real=None)
    loader = DataLoader(ImageDataset(records, clf.transform, config.data.max_image_pixels),
                        batch_size=config.evaluate.batch_size, num_workers=config.classify.num_workers,
                        collate_fn=collate)
    n_classes = len(clf.classes)
    k = min(5, n_classes)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    top_k_hits = 0
    rejected = RejectionCounts()
    for batch in loader:
        for e in batch.rejected:
            rejected.add(e)
        if not len(batch.labels):
            continue
        logits = clf.logits(batch.images)
        pred = logits.argmax(-1)
        pairs = batch.labels * n_classes + pred
        confusion += torch.bincount(pairs, minlength=n_classes**2).view(n_classes, n_classes)
        top_k_hits += int((logits.topk(k, dim=-1).indices == batch.labels[:, None]).any(-1).sum())
    n = int(confusion.sum())
    if rejected.total:
        log.warning("evaluate: %d of %d images could not be loaded and are not scored (%s)", rejected.total,
                    len(records), ", ".join(f"{r}: {c}" for r, c in sorted(rejected.by_reason.items())))
    if n == 0:
        raise UserError(f"{manifest_path}: no images could be scored ({len(records)} listed, "
                        f"{rejected.total} rejected)")

    per_class_n = confusion.sum(1)
    per_class = {c.slug: (int(confusion[i, i]) / int(per_class_n[i]) if per_class_n[i] else None)
                 for i, c in enumerate(clf.classes)}
    scored = [a for a in per_class.values() if a is not None]
    metrics = {
        "fingerprint": fingerprint,
        "n": n,
        "rejected": rejected.total,
        "rejected_by_reason": rejected.to_dict()["by_reason"],
        "top1": int(confusion.trace()) / n,
        "top5": top_k_hits / n,
        "top5_k": k,
        "mean_per_class": sum(scored) / len(scored),
        "per_class": per_class,
        "per_class_n": {c.slug: int(per_class_n[i]) for i, c in enumerate(clf.classes)},
        "num_classes": n_classes,
        "classes": [c.slug for c in clf.classes],
        "confusion": confusion.tolist(),  # rows = true class, columns = predicted, in `classes` order
        "classifier": str(classifier_dir),
        "manifest": str(manifest_path),
    }
    # Publish: the folder appears whole with metrics.json in it, or not at all.
    with staged_dir(out) as tmp:
        (tmp / CONFUSION).write_text(confusion_csv(confusion, clf.classes), encoding="utf-8")
        atomic_write_json(tmp / METRICS, metrics)
    log.info("evaluate: top-1 %.2f%%, top-%d %.2f%% on %d images (%d rejected) -> %s",
             100 * metrics["top1"], k, 100 * metrics["top5"], n, rejected.total, out)
    return metrics
