"""Quality of a synthetic set, measured with the frozen base CLIP (docs/method.md, "Assessing the
synthetic set").

The metrics are pure functions on L2-normalised CLIP embeddings (numpy arrays, one row per image or
prompt), so tests check them against direct numpy computations:

  clip_score        mean 100·cos(image, its class prompt) (CLIPScore, Hessel et al. 2021, without
                    the 2.5 rescaling and the clip at 0)
  class_agreement   share of images that zero-shot CLIP over all class prompts assigns to their class
  diversity         mean pairwise cosine distance 1 − cos among a class's images
  near_copies       images whose cosine similarity to some real shot is ≥ a threshold (memorisation)
  frechet_distance  Fréchet distance between Gaussians fitted to two feature sets (FD in CLIP space,
                    Kynkäänniemi et al. 2023)
  precision_recall  k-NN manifold precision and recall (Kynkäänniemi et al. 2019), k = 3

The rest computes the features (once per image, in batches, with the CLIP that classify starts
from), keeps them beside a SyntheticSet (`quality_features.safetensors`), turns them into
`quality.json`, and filters a class's images (drop, then replace with fresh seeds) when
`assess.filter` asks for it. `generate` calls it per class and per shard; `generate.merge` combines
the shards' features.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FEATURES = "quality_features.safetensors"
REPORT = "quality.json"
DROPPED = "dropped.jsonl"

K_NN = 3  # Kynkäänniemi et al. 2019, section 3: k = 3 balances a tight and a complete manifold estimate
# k-NN precision/recall is quadratic in the rows: beyond this many per side (ImageNet's 500 images × 1000
# classes), both sides are subsampled, as Kynkäänniemi et al. 2019 evaluate on 50k-image samples.
PR_MAX_ROWS = 20_000


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def clip_score(images: np.ndarray, prompt: np.ndarray) -> float:
    """Mean CLIPScore, 100·cos, of image embeddings [N, D] against one prompt embedding [D]."""
    return float(np.mean(100.0 * normalize(images) @ normalize(prompt[None])[0]))


def zero_shot(images: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """The class each image embedding [N, D] is closest to among the class prompts [C, D]."""
    return np.argmax(normalize(images) @ normalize(prompts).T, axis=1)


def class_agreement(images: np.ndarray, prompts: np.ndarray, label: int) -> float:
    """Share of images [N, D] that zero-shot CLIP over all class prompts [C, D] assigns to `label`."""
    return float(np.mean(zero_shot(images, prompts) == label))


def diversity(features: np.ndarray) -> float | None:
    """Mean cosine distance (1 − cos) over all unordered pairs of rows; None with fewer than 2 rows."""
    n = len(features)
    if n < 2:
        return None
    f = normalize(features)
    sims = f @ f.T
    pairs = (sims.sum() - np.trace(sims)) / 2
    return float(1.0 - pairs / (n * (n - 1) / 2))


def nearest(synthetic: np.ndarray, real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each synthetic row: the index of its most similar real row and that cosine similarity."""
    sims = normalize(synthetic) @ normalize(real).T
    idx = np.argmax(sims, axis=1)
    return idx, sims[np.arange(len(idx)), idx]


def near_copies(synthetic: np.ndarray, real: np.ndarray, threshold: float) -> np.ndarray:
    """Mask of synthetic rows whose cosine similarity to some real row is ≥ threshold."""
    if len(real) == 0 or len(synthetic) == 0:
        return np.zeros(len(synthetic), dtype=bool)
    return nearest(synthetic, real)[1] >= threshold


def _moments(x: np.ndarray, chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample covariance (n − 1) in float64, a chunk of rows at a time, so a large float32 feature
    set is never copied whole."""
    x = np.asarray(x)
    mu = x.mean(0, dtype=np.float64)
    cov = np.zeros((x.shape[1], x.shape[1]))
    for i in range(0, len(x), chunk):
        c = x[i:i + chunk].astype(np.float64) - mu
        cov += c.T @ c
    return mu, cov / (len(x) - 1)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||μa − μb||² + Tr(Σa + Σb − 2(Σa Σb)^½) between Gaussians fitted to rows of a and b.

    Tr (Σa Σb)^½ is computed as Tr (Σa^½ Σb Σa^½)^½, the same eigenvalues, but a symmetric
    positive semi-definite matrix, so eigh is exact and stable (no complex parts to discard, unlike
    scipy.linalg.sqrtm of the non-symmetric product)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Fréchet distance needs at least 2 rows on each side, got {len(a)} and {len(b)}")
    (mu_a, sa), (mu_b, sb) = _moments(a), _moments(b)
    mu = mu_a - mu_b
    ra = _psd_sqrt(sa)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(ra @ sb @ ra), 0, None)).sum()
    return float(max(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * cross, 0.0))


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.clip(d, 0, None)


def _radii(x: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """Squared distance from each row to its k-th nearest other row (in row chunks: memory O(chunk·n))."""
    out = np.empty(len(x))
    for i in range(0, len(x), chunk):
        d = _sq_dists(x[i:i + chunk], x)
        d[np.arange(len(d)), np.arange(i, i + len(d))] = np.inf
        out[i:i + chunk] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return out


def _coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray, chunk: int = 4096) -> float:
    inside = [(_sq_dists(queries[i:i + chunk], manifold) <= radii[None, :]).any(1)
              for i in range(0, len(queries), chunk)]
    return float(np.concatenate(inside).mean())


def subsample(x: np.ndarray, n: int | None, seed: int = 0) -> np.ndarray:
    """At most n rows of x, drawn without replacement by a fixed seed (all of them, in order, if fewer)."""
    if n is None or len(x) <= n:
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))]


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = K_NN,
                     max_rows: int | None = None) -> tuple[float, float]:
    """k-NN precision and recall (Kynkäänniemi et al. 2019): precision is the share of fake rows inside
    the real manifold (the union of balls around each real row reaching its k-th nearest real
    neighbour), recall the share of real rows inside the fake manifold. Euclidean distances. The cost
    is quadratic in the rows, so with `max_rows` each side is first subsampled to that many (fixed seed)."""
    real = subsample(np.asarray(real, dtype=np.float64), max_rows)
    fake = subsample(np.asarray(fake, dtype=np.float64), max_rows)
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"k-NN precision/recall with k={k} needs more than {k} rows on each side, "
                         f"got {len(real)} real and {len(fake)} fake")
    return _coverage(real, _radii(real, k), fake), _coverage(fake, _radii(fake, k), real)


# --- features --------------------------------------------------------------------------------------------


class Embedder:
    """The frozen base CLIP (`models.clip`, the model classify starts from, never a trained one):
    L2-normalised image and text embeddings, computed in batches of `assess.batch_size`."""

    def __init__(self, config, device=None):
        from datadream.data.loading import eval_transform
        from datadream.models.clip import load_clip
        from datadream.runtime import autocast_dtype, resolve_device

        self.device = device if device is not None else resolve_device(config.run)
        self.model, self.tokenizer, preprocess = load_clip(config.models, self.device)
        self.amp = autocast_dtype(config.run, self.device)
        self.transform = eval_transform(preprocess)
        self.batch_size, self.max_pixels = config.assess.batch_size, config.data.max_image_pixels
        self.images_seen = 0

    def _encode(self, fn, x):
        import contextlib

        import torch

        ctx = torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            f = fn(x.to(self.device)).float()
        return torch.nn.functional.normalize(f, dim=-1).cpu().numpy()

    def images(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        from concurrent.futures import ThreadPoolExecutor

        import torch

        from datadream.data.images import load_rgb

        def load(p):
            return self.transform(load_rgb(p, self.max_pixels))

        out = []
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # decode overlaps the GPU
            for i in range(0, len(paths), self.batch_size):
                batch = torch.stack(list(pool.map(load, paths[i:i + self.batch_size])))
                out.append(self._encode(self.model.encode_image, batch))
        self.images_seen += len(paths)
        return _stored(np.concatenate(out)) if out else np.zeros((0, 0), np.float32)

    def texts(self, prompts: Sequence[str]) -> np.ndarray:
        return _stored(self._encode(self.model.encode_text, self.tokenizer(list(prompts))))


def _stored(x: np.ndarray) -> np.ndarray:
    """Features as they are stored (float16), so a shard's figures and the gathered set's agree exactly."""
    return np.asarray(x, dtype=np.float16).astype(np.float32)


@dataclass
class Features:
    """A SyntheticSet's CLIP features: each class's prompt (by class index), the kept synthetic images,
    the real shots and the val images of the set's classes, with labels and paths."""

    text: np.ndarray
    synthetic: np.ndarray
    synthetic_label: np.ndarray
    synthetic_path: list[str]
    real: np.ndarray
    real_label: np.ndarray
    real_path: list[str]
    val: np.ndarray
    val_label: np.ndarray
    model: dict[str, Any] = field(default_factory=dict)

    _ARRAYS = ("text", "synthetic", "synthetic_label", "real", "real_label", "val", "val_label")

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.numpy import save

        from datadream.io import atomic_write_bytes

        tensors = {k: np.ascontiguousarray(getattr(self, k)).astype(np.int64 if k.endswith("_label") else np.float16)
                   for k in self._ARRAYS}
        meta = {"synthetic_path": json.dumps(self.synthetic_path), "real_path": json.dumps(self.real_path),
                "model": json.dumps(self.model)}
        atomic_write_bytes(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Features:
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            meta = f.metadata()
            arrays = {k: f.get_tensor(k) for k in cls._ARRAYS}
        arrays = {k: v if k.endswith("_label") else v.astype(np.float32) for k, v in arrays.items()}
        return cls(**arrays, synthetic_path=json.loads(meta["synthetic_path"]),
                   real_path=json.loads(meta["real_path"]), model=json.loads(meta["model"]))

    @classmethod
    def concat(cls, parts: list[Features]) -> Features:
        def cat(name):
            return np.concatenate([getattr(p, name) for p in parts])

        return cls(parts[0].text, cat("synthetic"), cat("synthetic_label"),
                   [x for p in parts for x in p.synthetic_path], cat("real"), cat("real_label"),
                   [x for p in parts for x in p.real_path], cat("val"), cat("val_label"), parts[0].model)


# --- filtering ---------------------------------------------------------------------------------------------


@dataclass
class Judged:
    """One class's images after filtering: kept indices with their features, dropped ones with reasons."""

    kept: list[int]
    features: np.ndarray
    dropped: list[dict[str, Any]]
    rounds: int


def judge(cfg, label: int, images: np.ndarray, text: np.ndarray, real: np.ndarray,
          floor: float | None) -> tuple[list[dict[str, Any] | None], float | None]:
    """Why each image [N, D] of class `label` is dropped (None = kept) under `cfg` (AssessConfig).

    bottom_fraction: the first call (round 0, `floor` None) drops the class's lowest-CLIPScore
    `filter_fraction` and returns the highest score it dropped as the floor; replacements at or
    below that floor are dropped too, so a fraction is never re-drawn from the replacements."""
    reasons: list[dict[str, Any] | None] = [None] * len(images)
    if cfg.filter == "none" or not len(images):
        return reasons, floor
    scores = 100.0 * normalize(images) @ normalize(text[label][None])[0]
    if cfg.filter == "disagree":
        picks = zero_shot(images, text)
        for i in np.flatnonzero(picks != label):
            reasons[i] = {"reason": "disagree", "assigned": int(picks[i])}
    else:
        if floor is None:
            m = round(cfg.filter_fraction * len(images))
            low = sorted(range(len(images)), key=lambda i: (scores[i], i))[:m]
            floor = float(scores[low[-1]]) if low else float("-inf")
        for i in np.flatnonzero(scores <= floor):
            reasons[i] = {"reason": "bottom_fraction", "clip_score": round(float(scores[i]), 4)}
    if len(real):
        idx, sim = nearest(images, real)
        for i in np.flatnonzero(sim >= cfg.copy_threshold):
            reasons[i] = {"reason": "near_copy", "shot": int(idx[i]), "similarity": round(float(sim[i]), 4)}
    return reasons, floor


def filter_class(cfg, label: int, n: int, embed: Callable[[list[int]], np.ndarray],
                 make: Callable[[list[int]], None], text: np.ndarray, real: np.ndarray) -> Judged:
    """Judge images 0..n-1 of a class, then replace the dropped ones with new indices n, n+1, … (each
    index has its own seed) for up to `cfg.max_rounds` rounds. Deterministic: the same features give
    the same drops, and an index is generated once whether or not the process was restarted."""
    new, kept, feats, dropped, floor, rounds, next_index = list(range(n)), [], [], [], None, 0, n
    while True:
        f = embed(new)
        reasons, floor = judge(cfg, label, f, text, real, floor)
        for i, why in zip(new, reasons, strict=True):
            if why is None:
                kept.append(i)
            else:
                dropped.append({"index": i, "round": rounds, **why})
        feats += [row for row, why in zip(f, reasons, strict=True) if why is None]
        missing = n - len(kept)
        if not missing or rounds == cfg.max_rounds:
            break
        rounds += 1
        new = list(range(next_index, next_index + missing))
        next_index += missing
        make(new)
    order = np.argsort(kept, kind="stable")
    stacked = np.stack(feats) if feats else np.zeros((0, text.shape[1]), np.float32)
    return Judged([kept[i] for i in order], stacked[order], dropped, rounds)


# --- the report ---------------------------------------------------------------------------------------------


def _round(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def summarize(features: Features, classes: list, copy_threshold: float,
              dropped: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """quality.json's content: one entry per class of `classes` (the dataset's ClassInfo list) that has
    synthetic images in `features`, and the overall figures."""
    names = {c.index: c.name for c in classes}
    per_class: dict[str, dict[str, Any]] = {}
    dropped_by_class: dict[str, Counter] = {}
    for d in dropped or []:
        dropped_by_class.setdefault(d["class"], Counter())[d["reason"]] += 1
    for c in classes:
        m = features.synthetic_label == c.index
        if not m.any():
            continue
        s, r = features.synthetic[m], features.real[features.real_label == c.index]
        paths = [p for p, keep in zip(features.synthetic_path, m, strict=True) if keep]
        real_paths = [p for p, lab in zip(features.real_path, features.real_label, strict=True) if lab == c.index]
        picks = zero_shot(s, features.text)
        copies = near_copies(s, r, copy_threshold)
        entry: dict[str, Any] = {
            "slug": c.slug, "images": int(m.sum()), "real_shots": len(r),
            "clip_score": _round(clip_score(s, features.text[c.index]), 3),
            "class_agreement": _round(np.mean(picks == c.index)),
            "diversity": _round(diversity(s)), "real_diversity": _round(diversity(r)),
            "near_copies": _round(np.mean(copies)),
            "assigned_elsewhere": {names.get(int(k), str(k)): int(v)
                                   for k, v in sorted(Counter(picks[picks != c.index].tolist()).items())},
        }
        if len(r):
            idx, sim = nearest(s, r)
            entry["near_copy_images"] = [{"image": paths[i], "shot": real_paths[idx[i]],
                                          "similarity": _round(sim[i])} for i in np.flatnonzero(copies)]
        else:
            entry["near_copy_images"] = []
        if c.slug in dropped_by_class:
            entry["dropped"] = dict(sorted(dropped_by_class[c.slug].items()))
        per_class[c.name] = entry
    overall: dict[str, Any] = {"images": len(features.synthetic), "val_images": len(features.val)}
    for key in ("clip_score", "class_agreement", "near_copies", "diversity", "real_diversity"):
        values = [e[key] for e in per_class.values() if e[key] is not None]
        overall[key] = _round(np.mean(values)) if values else None
    notes = []
    try:
        overall["fd_clip"] = _round(frechet_distance(features.synthetic, features.val), 5)
    except ValueError as e:
        overall["fd_clip"] = None
        notes.append(f"fd_clip: {e}")
    try:
        p, r = precision_recall(features.val, features.synthetic, max_rows=PR_MAX_ROWS)
        overall["precision"], overall["recall"] = _round(p), _round(r)
        if max(len(features.val), len(features.synthetic)) > PR_MAX_ROWS:
            notes.append(f"precision/recall: each side subsampled to at most {PR_MAX_ROWS} rows (seed 0)")
    except ValueError as e:
        overall["precision"] = overall["recall"] = None
        notes.append(f"precision/recall: {e}")
    if dropped is not None:
        overall["dropped"] = dict(sorted(Counter(d["reason"] for d in dropped).items()))
    return {"copy_threshold": copy_threshold, "k": K_NN, "features": features.model, "overall": overall,
            "classes": per_class, **({"notes": notes} if notes else {})}


def read_report(synthetic_dir: str | os.PathLike) -> dict[str, Any] | None:
    """quality.json of a SyntheticSet, or None when the set was not assessed."""
    from datadream.io import read_json

    path = Path(synthetic_dir) / REPORT
    return read_json(path) if path.is_file() else None


# --- tracking ------------------------------------------------------------------------------------------------

# The figures a pipeline's parent run carries, so MLflow's runs table compares synthetic sets across runs.
PARENT_METRICS = {"synthetic_class_agreement": "class_agreement", "synthetic_fd_clip": "fd_clip"}
_OVERALL = ("class_agreement", "clip_score", "diversity", "real_diversity", "near_copies", "fd_clip", "precision",
            "recall", "images")
_PER_CLASS = ("images", "class_agreement", "clip_score", "diversity", "real_diversity", "near_copies")


def run_metrics(report: dict[str, Any]) -> dict[str, float]:
    """quality.json's overall figures as flat metrics (the step's MLflow run and KFP Metrics); None left out."""
    o = report["overall"]
    metrics = {k: float(o[k]) for k in _OVERALL if o.get(k) is not None}
    if o.get("dropped") is not None:
        metrics["dropped"] = float(sum(o["dropped"].values()))
    return metrics


def parent_metrics(report: dict[str, Any]) -> dict[str, float]:
    o = report["overall"]
    return {name: float(o[key]) for name, key in PARENT_METRICS.items() if o.get(key) is not None}


def class_table(report: dict[str, Any]) -> dict[str, list]:
    """One row per class (columns: class, then the per-class figures), for MLflow's table artifact."""
    names = sorted(report["classes"])
    table: dict[str, list] = {"class": names}
    for key in _PER_CLASS:
        table[key] = [report["classes"][n][key] for n in names]
    return table
