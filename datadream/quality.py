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
"""

from __future__ import annotations

import numpy as np

K_NN = 3  # Kynkäänniemi et al. 2019, section 3: k = 3 balances a tight and a complete manifold estimate


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


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||μa − μb||² + Tr(Σa + Σb − 2(Σa Σb)^½) between Gaussians fitted to rows of a and b.

    Tr (Σa Σb)^½ is computed as Tr (Σa^½ Σb Σa^½)^½, the same eigenvalues, but a symmetric
    positive semi-definite matrix, so eigh is exact and stable (no complex parts to discard, unlike
    scipy.linalg.sqrtm of the non-symmetric product)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Fréchet distance needs at least 2 rows on each side, got {len(a)} and {len(b)}")
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ra = _psd_sqrt(sa)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(ra @ sb @ ra), 0, None)).sum()
    return float(max(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * cross, 0.0))


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.clip(d, 0, None)


def _radii(x: np.ndarray, k: int) -> np.ndarray:
    """Squared distance from each row to its k-th nearest other row."""
    d = _sq_dists(x, x)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def _coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray, chunk: int = 4096) -> float:
    inside = [(_sq_dists(queries[i:i + chunk], manifold) <= radii[None, :]).any(1)
              for i in range(0, len(queries), chunk)]
    return float(np.concatenate(inside).mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = K_NN) -> tuple[float, float]:
    """k-NN precision and recall (Kynkäänniemi et al. 2019): precision is the share of fake rows inside
    the real manifold (the union of balls around each real row reaching its k-th nearest real
    neighbour), recall the share of real rows inside the fake manifold. Euclidean distances."""
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"k-NN precision/recall with k={k} needs more than {k} rows on each side, "
                         f"got {len(real)} real and {len(fake)} fake")
    return _coverage(real, _radii(real, k), fake), _coverage(fake, _radii(fake, k), real)
