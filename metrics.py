"""The metric math of ADM's evaluator suite as small pure numpy functions.

Follows openai/guided-diffusion evaluations/evaluator.py: FID / sFID from Gaussian
statistics of features, Inception Score over splits of 5000, and improved
precision / recall (Kynkaanniemi et al. 2019) with k-th nearest neighbour balls.
Feature extraction lives in evaluator.py; everything here takes feature arrays.

Precision / recall reproduce the arithmetic of ADM's ManifoldEstimator / DistanceBlock (a
TensorFlow graph): squared distances (|a|^2 - 2 a.b^T) + |b|^2 with every op rounded to float16,
the whole 10000 x 10000 block recomputed in float32 when any entry is not finite, radii and
comparisons in float32, ties counted inside (<=).  `precision_recall(..., dtype="float32")`
gives the same algorithm with float32 distances.  Inside a single op (the row sums of squares,
the a.b^T products) the order in which a device accumulates is not fixed by the graph (TF's CPU
and GPU kernels differ); here each op's exact result is rounded once to its dtype, which makes
the distances independent of the block shape and of the BLAS library.
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


ADM_BATCH_SIZE = 10000  # ADM's ManifoldEstimator row_batch_size = col_batch_size
PR_DTYPES = ("float16", "float32")


def _row_sums(x):
    """Row sums of a float16 / float32 matrix as one op of that dtype: the exact sum, rounded once.

    The terms are values of that dtype: float64 holds a sum of float16 terms exactly, and one of
    float32 terms far more precisely than a float32 rounding step.
    """
    return x.astype(np.float64).sum(1).astype(x.dtype)


def pairwise_sq_distances(a, b, dtype="float32", chunk=1024):
    """ADM's squared distances between rows of a (n x D) and b (m x D) in `dtype` arithmetic, raw.

    The features go to float32 (ADM's placeholders), then to `dtype` (round to nearest even);
    each op of ADM's graph rounds its result to `dtype`: squares, row sums of squares, a.b^T,
    the doubling, (|a|^2 - 2 a.b^T) + |b|^2 left to right, and max(., 0).  Each op is its
    exact result rounded once (a device may accumulate inside an op in another order).  In
    float16 the result may hold inf / nan; an overflow in a.b^T alone gives |a|^2 - inf + |b|^2
    = -inf, which max(., 0) turns into a finite 0, as in ADM.  Rows of `a` go `chunk` at a
    time (float64 temporaries of chunk x m).
    """
    a = np.asarray(a, dtype=np.float32).astype(dtype)
    b = np.asarray(b, dtype=np.float32).astype(dtype)
    out = np.empty((len(a), len(b)), dtype=a.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        norm_a, norm_b = _row_sums(np.square(a)), _row_sums(np.square(b))
        b64 = b.astype(np.float64)
        for i in range(0, len(a), chunk):
            dot = (a[i:i + chunk].astype(np.float64) @ b64.T).astype(a.dtype)
            d = (norm_a[i:i + chunk, None] - a.dtype.type(2) * dot) + norm_b[None, :]
            out[i:i + chunk] = np.maximum(d, a.dtype.type(0))
    return out


def distance_block(a, b, dtype="float16"):
    """One block of ADM's squared distances as float32, like its DistanceBlock.pairwise_distances.

    dtype="float16": ADM's float16 arithmetic, and when any entry of the block is not finite
    (a squared norm overflowed float16) the whole block is recomputed in float32.  ADM's
    blocks are row batch x column batch, so the fallback is decided per block.
    dtype="float32": float32 arithmetic throughout.
    """
    if dtype not in PR_DTYPES:
        raise ValueError(f"dtype must be one of {PR_DTYPES}, got {dtype!r}")
    if dtype == "float16":
        d = pairwise_sq_distances(a, b, "float16")
        if np.isfinite(d).all():
            return d.astype(np.float32)
    return pairwise_sq_distances(a, b, "float32")


def manifold_radii(features, k=3, batch_size=ADM_BATCH_SIZE, dtype="float32"):
    """Squared distance from each feature to its k-th nearest neighbour in the same set (float32).

    Index k of the sorted row (index 0 is the point itself), like ADM's ManifoldEstimator.
    Distances come from `distance_block(rows, cols, dtype)` on batch_size x batch_size blocks;
    each row keeps only its k+1 smallest values per block, which leaves the k-th smallest of the
    whole row unchanged (ADM holds a batch_size x N row batch instead).  The default dtype here
    is float32; `precision_recall` asks for ADM's float16.
    """
    features = np.asarray(features)
    if len(features) <= k:
        raise ValueError(f"need more than k={k} features for manifold radii, got {len(features)}")
    radii = np.empty(len(features), dtype=np.float32)
    for i in range(0, len(features), batch_size):
        rows = features[i:i + batch_size]
        smallest = []
        for j in range(0, len(features), batch_size):
            d = distance_block(rows, features[j:j + batch_size], dtype)
            smallest.append(np.partition(d, k, axis=1)[:, :k + 1] if d.shape[1] > k + 1 else d)
        radii[i:i + batch_size] = np.partition(np.concatenate(smallest, axis=1), k, axis=1)[:, k]
    return radii


def manifold_membership(ref_features, ref_radii, sample_features, sample_radii,
                        batch_size=ADM_BATCH_SIZE, dtype="float16"):
    """(sample_in_ref, ref_in_sample): boolean arrays, inside at least one ball of the other set.

    ADM's evaluate_pr: one distance block per (reference batch, sample batch), both directions
    read from that same block, a point counts as inside when distance <= radius (ties inside).
    """
    ref_features, sample_features = np.asarray(ref_features), np.asarray(sample_features)
    sample_in_ref = np.zeros(len(sample_features), dtype=bool)
    ref_in_sample = np.zeros(len(ref_features), dtype=bool)
    for i in range(0, len(ref_features), batch_size):
        for j in range(0, len(sample_features), batch_size):
            d = distance_block(ref_features[i:i + batch_size], sample_features[j:j + batch_size], dtype)
            ref_in_sample[i:i + batch_size] |= (d <= sample_radii[None, j:j + batch_size]).any(axis=1)
            sample_in_ref[j:j + batch_size] |= (d <= ref_radii[i:i + batch_size, None]).any(axis=0)
    return sample_in_ref, ref_in_sample


def precision_recall(ref_features, sample_features, k=3, batch_size=ADM_BATCH_SIZE, dtype="float16"):
    """(precision, recall): samples inside the reference manifold, references inside the sample manifold.

    The default is ADM's evaluator arithmetic (see the module docstring): float16 distances with
    its per-block float32 fallback on overflow, 10000 x 10000 blocks, k=3, ties inside.  dtype="float32" computes
    every distance in float32 (same algorithm); on the same features it typically counts a few
    samples fewer inside, since float16 rounding turns near-ties into ties.  `batch_size` only
    changes the result where a block falls back to float32.
    """
    if dtype not in PR_DTYPES:
        raise ValueError(f"dtype must be one of {PR_DTYPES}, got {dtype!r}")
    ref_radii = manifold_radii(ref_features, k, batch_size, dtype)
    sample_radii = manifold_radii(sample_features, k, batch_size, dtype)
    sample_in_ref, ref_in_sample = manifold_membership(ref_features, ref_radii, sample_features, sample_radii,
                                                       batch_size, dtype)
    return float(sample_in_ref.mean()), float(ref_in_sample.mean())
