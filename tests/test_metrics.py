"""The ADM metric math against closed forms and toy manifolds with known answers."""
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from metrics import (compute_statistics, frechet_distance, inception_score, inception_score_from_logits,
                     manifold_radii, precision_recall)


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_full_covariance_matches_eigen_form():
    """Tr sqrt(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))): an independent route for dense covariances."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_covmean = np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)).sum()
    mu = rng.normal(size=6)
    expected = mu @ mu + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert frechet_distance(mu, s1, np.zeros(6), s2) == pytest.approx(expected, rel=1e-8)


def test_fid_of_a_set_with_itself_is_zero_even_when_singular():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(300, 16))
    feats[:, :4] = 0.0  # dead features: singular covariance, as with ReLU features in practice
    stats = compute_statistics(feats)
    assert abs(frechet_distance(*stats, *stats)) < 1e-6
    shifted = compute_statistics(feats + 1.0)
    assert frechet_distance(*stats, *shifted) == pytest.approx(16.0, rel=1e-6)


def test_inception_score_uniform_predictions_is_one():
    assert inception_score(np.full((100, 10), 0.1)) == pytest.approx(1.0)
    assert inception_score_from_logits(np.zeros((100, 10))) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [2, 10])
def test_inception_score_confident_balanced_is_num_classes(k):
    labels = np.arange(10_000) % k
    probs = np.eye(k)[labels]  # exact zeros: xlogy keeps them finite
    assert inception_score(probs) == pytest.approx(k)
    assert inception_score_from_logits(50.0 * probs) == pytest.approx(k, rel=1e-6)


def test_inception_score_averages_splits():
    """ADM: mean of per-split scores, not the score of the pooled set."""
    probs = np.concatenate([np.full((5000, 4), 0.25), np.eye(4)[np.arange(5000) % 4]])
    assert inception_score(probs, split_size=5000) == pytest.approx((1 + 4) / 2)


def test_manifold_radii_is_kth_neighbour_squared_distance():
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(57, 5)).astype(np.float32)
    brute = np.sort(cdist(feats, feats, "sqeuclidean"), axis=1)[:, 3]
    np.testing.assert_allclose(manifold_radii(feats, k=3, batch_size=10), brute, rtol=1e-4, atol=1e-5)


def two_clusters(rng, n=200, gap=100.0):
    a = rng.normal(size=(n, 4))
    return a, a + gap


def test_precision_recall_identical_sets():
    feats = np.random.default_rng(4).normal(size=(150, 8))
    assert precision_recall(feats, feats) == (1.0, 1.0)


def test_precision_recall_far_apart_clusters():
    a, b = two_clusters(np.random.default_rng(5))
    assert precision_recall(a, b) == (0.0, 0.0)


def test_precision_recall_half_coverage_and_batching():
    """Samples cover one of the reference's two clusters: all samples are real, half the reference is missed."""
    a, b = two_clusters(np.random.default_rng(6))
    ref = np.concatenate([a, b])
    assert precision_recall(ref, a) == (1.0, 0.5)
    assert precision_recall(ref, a, batch_size=7) == (1.0, 0.5)
    precision, recall = precision_recall(ref, np.random.default_rng(7).normal(size=(200, 4)))
    assert precision > 0.9 and recall == pytest.approx(0.5, abs=0.05)
