"""The synthetic-set metrics against direct numpy computations and hand-made cases with known answers."""

import itertools

import numpy as np
import pytest
import scipy.linalg

from datadream import quality


def _unit(rng, n, d=8):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_clip_score_agreement_diversity_match_loops():
    rng = np.random.default_rng(0)
    images, prompts = _unit(rng, 7), _unit(rng, 3)
    label = 1
    cos = [float(np.dot(i, prompts[label])) for i in images]
    assert quality.clip_score(images * 3.0, prompts[label]) == pytest.approx(100 * np.mean(cos))
    picks = [int(np.argmax([np.dot(i, p) for p in prompts])) for i in images]
    assert quality.class_agreement(images, prompts, label) == pytest.approx(np.mean([p == label for p in picks]))
    dists = [1 - np.dot(a, b) for a, b in itertools.combinations(images, 2)]
    assert quality.diversity(images) == pytest.approx(np.mean(dists))
    assert quality.diversity(images[:1]) is None
    assert quality.diversity(np.repeat(images[:1], 4, axis=0)) == pytest.approx(0.0, abs=1e-12)


def test_near_copies_flag_exactly_the_planted_copies():
    rng = np.random.default_rng(1)
    real, synthetic = _unit(rng, 5, 64), _unit(rng, 6, 64)
    synthetic[2] = real[4]
    synthetic[5] = real[0] + 1e-3 * rng.normal(size=64)
    mask = quality.near_copies(synthetic, real, 0.95)
    assert mask.tolist() == [False, False, True, False, False, True]
    idx, sim = quality.nearest(synthetic, real)
    assert idx[2] == 4 and sim[2] == pytest.approx(1.0)
    assert not quality.near_copies(synthetic, real[:0], 0.95).any()


def _fd_reference(a, b):
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(mu @ mu + np.trace(sa + sb - 2 * scipy.linalg.sqrtm(sa @ sb).real))


def test_frechet_distance_matches_sqrtm_and_the_closed_form():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(50, 6)), rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6)) + 0.5
    assert quality.frechet_distance(a, b) == pytest.approx(_fd_reference(a, b), rel=1e-6)
    assert quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    mu, cov = quality._moments(b, chunk=7)  # chunked moments are numpy's
    np.testing.assert_allclose(mu, b.mean(0))
    np.testing.assert_allclose(cov, np.cov(b, rowvar=False))
    # Gaussians with known parameters: FD = |μa − μb|² + Σ (√σa − √σb)² for diagonal covariances.
    mu_a, mu_b = np.array([0.0, 1.0, -1.0]), np.array([2.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([1.0, 1.0, 1.0])
    n = 200_000
    a = mu_a + np.sqrt(var_a) * rng.normal(size=(n, 3))
    b = mu_b + np.sqrt(var_b) * rng.normal(size=(n, 3))
    known = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)  # 5 + 1.25
    assert quality.frechet_distance(a, b) == pytest.approx(known, rel=0.02)


def _pr_reference(real, fake, k):
    def radius(x, i):
        return sorted(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i)[k - 1]

    def inside(manifold, q):
        return any(np.linalg.norm(q - m) <= radius(manifold, i) + 1e-12 for i, m in enumerate(manifold))

    return np.mean([inside(real, f) for f in fake]), np.mean([inside(fake, r) for r in real])


def test_precision_recall_match_a_loop_and_known_cases():
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(30, 4)), rng.normal(size=(25, 4)) * 1.5 + 0.3
    p, r = quality.precision_recall(real, fake, k=3)
    ref_p, ref_r = _pr_reference(real, fake, 3)
    assert (p, r) == (pytest.approx(ref_p), pytest.approx(ref_r))
    assert 0 < p < 1 and 0 < r < 1
    # The same set: every point lies in its own ball.
    assert quality.precision_recall(real, real) == (1.0, 1.0)
    # Far apart: nothing of either lies in the other's manifold.
    assert quality.precision_recall(real, real + 100.0) == (0.0, 0.0)
    # Mode collapse: a tight blob at the centre of N(0, I) is all precision, almost no recall.
    big, blob = rng.normal(size=(2000, 2)), 0.01 * rng.normal(size=(500, 2))
    p, r = quality.precision_recall(big, blob)
    assert p == 1.0 and r < 0.01
    with pytest.raises(ValueError, match="more than 3 rows"):
        quality.precision_recall(real[:3], fake)
    # Chunked radii give the same answer; subsampling keeps a fixed, seeded share of each side.
    assert quality._radii(big, 3, chunk=7) == pytest.approx(quality._radii(big, 3))
    sub = quality.subsample(big, 100)
    assert len(sub) == 100 and np.array_equal(sub, quality.subsample(big, 100)) and quality.subsample(big, 5000) is big
    assert quality.precision_recall(big, blob, max_rows=400) == quality.precision_recall(
        quality.subsample(big, 400), quality.subsample(blob, 400))
