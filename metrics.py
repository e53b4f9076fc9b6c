"""The metric math of ADM's evaluator suite as small pure numpy functions.

Follows openai/guided-diffusion evaluations/evaluator.py: FID / sFID from Gaussian
statistics of features, Inception Score over splits of 5000, and improved
precision / recall (Kynkaanniemi et al. 2019) with k-th nearest neighbour balls.
Feature extraction lives in evaluator.py; everything here takes feature arrays.
"""
import warnings

import numpy as np
from scipy import linalg
from scipy.special import softmax, xlogy


def compute_statistics(features):
    """Mean and covariance of N x D features (float64, like ADM's np.cov)."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), with ADM's fallbacks for singular products.

    A non-finite square root (near-singular covariances) is retried with `eps` added to
    both diagonals; a complex result with a negligible imaginary diagonal keeps its real
    part, a significant one raises ValueError, as in ADM.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics have different shapes: {mu1.shape} {sigma1.shape} vs {mu2.shape} {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # ADM calls sqrtm(disp=False): singularity is handled below, not printed
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs, split_size=5000):
    """exp(E_x KL(p(y|x) || p(y))) averaged over consecutive splits of `split_size` (ADM).

    Takes class probabilities; use `inception_score_from_logits` for logits.  xlogy makes
    exact zeros (one-hot predictions) contribute 0 instead of nan.
    """
    probs = np.asarray(probs, dtype=np.float64)
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i:i + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def inception_score_from_logits(logits, split_size=5000):
    """Inception Score of (unnormalised) logits, softmax taken in float64."""
    return inception_score(softmax(np.asarray(logits, dtype=np.float64), axis=1), split_size)


def pairwise_sq_distances(a, b):
    """Squared Euclidean distances between rows of a (n x D) and b (m x D), as ADM (clamped at 0)."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    d = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]
    return np.maximum(d, 0)


def manifold_radii(features, k=3, batch_size=1000):
    """Squared distance from each feature to its k-th nearest neighbour in the same set.

    Index k of the sorted row (index 0 is the point itself), like ADM's ManifoldEstimator;
    rows are processed `batch_size` at a time, so memory is batch_size x N.
    """
    if len(features) <= k:
        raise ValueError(f"need more than k={k} features for manifold radii, got {len(features)}")
    radii = np.empty(len(features), dtype=np.float32)
    for i in range(0, len(features), batch_size):
        d = pairwise_sq_distances(features[i:i + batch_size], features)
        radii[i:i + batch_size] = np.partition(d, k, axis=1)[:, k]
    return radii


def manifold_coverage(points, manifold, radii, batch_size=1000):
    """Fraction of `points` inside at least one ball (manifold[j], radii[j]), in batch x batch blocks."""
    inside = np.zeros(len(points), dtype=bool)
    for i in range(0, len(points), batch_size):
        for j in range(0, len(manifold), batch_size):
            d = pairwise_sq_distances(points[i:i + batch_size], manifold[j:j + batch_size])
            inside[i:i + batch_size] |= (d <= radii[None, j:j + batch_size]).any(axis=1)
    return float(inside.mean())


def precision_recall(ref_features, sample_features, k=3, batch_size=1000):
    """(precision, recall): samples inside the reference manifold, references inside the sample manifold."""
    ref_radii = manifold_radii(ref_features, k, batch_size)
    sample_radii = manifold_radii(sample_features, k, batch_size)
    precision = manifold_coverage(sample_features, ref_features, ref_radii, batch_size)
    recall = manifold_coverage(ref_features, sample_features, sample_radii, batch_size)
    return precision, recall
