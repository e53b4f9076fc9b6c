"""The ADM metric math against closed forms and toy manifolds with known answers."""
import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from metrics import (compute_statistics, distance_block, frechet_distance, inception_score,
                     inception_score_from_logits, manifold_radii, pairwise_sq_distances, precision_recall)


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


# ADM's float16 precision / recall (guided-diffusion evaluations/evaluator.py, DistanceBlock)

def fp16_pair_sq_distance(u, v):
    """ADM's float16 squared distance of one pair, op by op with numpy float16 scalars.

    Inputs go float32 -> float16; every op's exact result is rounded to float16 (math.fsum
    gives the exact sums); (|u|^2 - 2 u.v) + |v|^2, then max(., 0) keeping nan.
    """
    u16 = [np.float16(np.float32(x)) for x in u]
    v16 = [np.float16(np.float32(x)) for x in v]
    norm_u = np.float16(math.fsum(float(x * x) for x in u16))  # x * x: a float16 square, rounded
    norm_v = np.float16(math.fsum(float(x * x) for x in v16))
    dot = np.float16(math.fsum(float(x) * float(y) for x, y in zip(u16, v16)))
    d = np.float16(np.float16(norm_u - np.float16(2) * dot) + norm_v)
    return d if (np.isnan(d) or d > 0) else np.float16(0)


def brute_fp16_precision_recall(ref, sample, k=3):
    """ADM's evaluate_pr written out pair by pair: (precision, recall, ref_radii, sample_radii), one block."""
    def block(a, b):
        d = np.array([[fp16_pair_sq_distance(u, v) for v in b] for u in a], dtype=np.float16)
        assert np.isfinite(d).all()  # no float32 fallback in these cases
        return d.astype(np.float32)
    ref_radii = np.array([sorted(row)[k] for row in block(ref, ref)], dtype=np.float32)
    sample_radii = np.array([sorted(row)[k] for row in block(sample, sample)], dtype=np.float32)
    d = block(ref, sample)  # ADM: reference rows, sample columns, both directions from it
    precision = np.mean([any(d[i, j] <= ref_radii[i] for i in range(len(ref))) for j in range(len(sample))])
    recall = np.mean([any(d[i, j] <= sample_radii[j] for j in range(len(sample))) for i in range(len(ref))])
    return precision, recall, ref_radii, sample_radii


def test_float16_precision_recall_equals_brute_force_adm_formula():
    rng = np.random.default_rng(8)
    ref, sample = 2.0 * rng.normal(size=(40, 16)), 2.0 * rng.normal(size=(50, 16)) + 0.3
    precision, recall, ref_radii, sample_radii = brute_fp16_precision_recall(ref, sample)
    np.testing.assert_array_equal(manifold_radii(ref, dtype="float16"), ref_radii)
    np.testing.assert_array_equal(manifold_radii(sample, dtype="float16"), sample_radii)
    assert precision_recall(ref, sample) == (precision, recall)
    assert not np.array_equal(ref_radii, manifold_radii(ref, dtype="float32"))  # float16 rounding was in play


def test_float16_block_matches_pairwise_formula_and_keeps_adm_orientation():
    rng = np.random.default_rng(9)
    a, b = 3.0 * rng.normal(size=(12, 32)), 3.0 * rng.normal(size=(9, 32))
    expected = np.array([[fp16_pair_sq_distance(u, v) for v in b] for u in a], dtype=np.float16)
    np.testing.assert_array_equal(pairwise_sq_distances(a, b, "float16"), expected)
    np.testing.assert_array_equal(distance_block(a, b), expected.astype(np.float32))
    np.testing.assert_array_equal(distance_block(a, b, "float32"), pairwise_sq_distances(a, b))
    # features reach float16 through float32 (ADM's placeholders): 1 + 2^-11 + 2^-30 becomes the
    # float16 tie 1 + 2^-11 in float32, which rounds to even (1.0); straight to float16 it is 1 + 2^-10
    x = 1 + 2.0 ** -11 + 2.0 ** -30
    assert np.float16(x) != np.float16(np.float32(x))
    assert distance_block([[x]], [[0.0]])[0, 0] == 1.0


def test_ties_after_float16_rounding_count_inside():
    """(-3, 2^-5) is 9 + 2^-10 from the origin, whose radius is 9: float16 rounds |u|^2 to 9, a tie, inside."""
    line = np.array([[x, 0.0] for x in range(5)])  # the origin's 3rd neighbour is (3, 0): radius 9
    sample = np.array([[-3.0, 2.0 ** -5], [100.0, 0.0], [101.0, 0.0], [102.0, 0.0]])
    assert manifold_radii(line, dtype="float16")[0] == manifold_radii(line, dtype="float32")[0] == 9.0
    assert distance_block(line[:1], sample[:1])[0, 0] == 9.0
    assert distance_block(line[:1], sample[:1], "float32")[0, 0] == np.float32(9 + 2.0 ** -10)
    assert precision_recall(line, sample) == (0.25, 1.0)  # ADM: the tie is inside (<=)
    assert precision_recall(line, sample, dtype="float32") == (0.0, 1.0)
    assert precision_recall(sample, line) == (1.0, 0.25)  # the same tie on the recall side
    assert precision_recall(sample, line, dtype="float32") == (1.0, 0.0)


def test_distances_are_reference_rows_times_sample_columns():
    """In float16 (|r|^2 - 2 r.s) + |s|^2 and (|s|^2 - 2 r.s) + |r|^2 round differently; ADM uses the first.

    36.2 and 30.7: (1310 - 2222) + 942.5 = 30.5, but (942.5 - 2222) rounds to -1280 and + 1310 = 30,
    the radius of the reference point 36.2: ADM's orientation leaves the sample 30.7 outside.
    """
    ref = np.array([[36.2], [51.0], [36.2], [37.9], [41.6]])
    sample = np.array([[30.7], [37.3], [41.6], [32.2]])
    assert manifold_radii(ref, dtype="float16")[0] == 30.0
    assert distance_block(ref[:1], sample[:1])[0, 0] == fp16_pair_sq_distance(ref[0], sample[0]) == 30.5
    assert distance_block(sample[:1], ref[:1])[0, 0] == 30.0
    assert precision_recall(ref, sample) == (0.75, 1.0)  # the other orientation would give (1.0, 1.0)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_duplicated_integer_vectors_are_inside_radius_zero_balls(dtype):
    """Four copies of each reference vector: radius 0, and a sample equal to one is at distance 0 <= 0."""
    ref = np.repeat([[1.0, 2.0, 3.0], [10.0, 10.0, 10.0]], 4, axis=0)
    sample = np.array([[1.0, 2.0, 3.0], [10.0, 10.0, 10.0], [1.0, 2.0, 4.0], [5.0, 5.0, 5.0]])
    np.testing.assert_array_equal(manifold_radii(ref, dtype=dtype), np.zeros(8, np.float32))
    assert precision_recall(ref, sample, dtype=dtype) == (0.5, 1.0)


def exact_precision_recall(ref, sample, k=3):
    """Precision / recall from float64 distances (scipy), for data without near-ties."""
    ref_radii = np.sort(cdist(ref, ref, "sqeuclidean"), axis=1)[:, k]
    sample_radii = np.sort(cdist(sample, sample, "sqeuclidean"), axis=1)[:, k]
    d = cdist(ref, sample, "sqeuclidean")
    return (d <= ref_radii[:, None]).any(axis=0).mean(), (d <= sample_radii[None, :]).any(axis=1).mean()


def test_float16_overflow_falls_back_to_float32():
    """Features ~256 in 64-d: |x|^2 ~ 4e6 overflows float16 (max 65504), so every block is float32."""
    rng = np.random.default_rng(10)
    ref, sample = rng.normal(size=(60, 64)), rng.normal(size=(80, 64)) + 0.2
    big_ref, big_sample = 256.0 * ref, 256.0 * sample
    assert not np.isfinite(pairwise_sq_distances(big_ref, big_sample, "float16")).all()
    block = distance_block(big_ref, big_sample)
    assert np.isfinite(block).all()
    np.testing.assert_array_equal(block, pairwise_sq_distances(big_ref, big_sample))
    result = precision_recall(big_ref, big_sample)
    # scaling by a power of two is exact in float32: the same counts as the unscaled float32 run
    assert result == precision_recall(ref, sample, dtype="float32") == exact_precision_recall(ref, sample)
    assert 0 < result[0] < 1 and 0 < result[1] < 1
    # all coordinates large and positive: every entry is |a|^2 - 2 a.b = inf - inf = nan, which
    # max(., 0) keeps (as TF's CPU kernel does), so these blocks fall back too
    allbig = 300.0 + 300.0 * np.abs(rng.normal(size=(6, 64)))
    assert np.isnan(pairwise_sq_distances(allbig, allbig, "float16")).all()
    np.testing.assert_array_equal(distance_block(allbig, allbig), pairwise_sq_distances(allbig, allbig))


def test_float16_fallback_is_per_block_and_misses_product_only_overflow():
    """ADM recomputes a whole block in float32 when any entry is not finite, and only then."""
    rng = np.random.default_rng(11)
    small = rng.normal(size=(5, 64))
    huge = 300.0 * small[:1]
    mixed = distance_block(np.concatenate([huge, small]), small)  # one overflowing row: all float32
    np.testing.assert_array_equal(mixed[1:], pairwise_sq_distances(small, small))
    alone = distance_block(small, small)  # the same rows in a block of their own stay float16
    np.testing.assert_array_equal(alone, pairwise_sq_distances(small, small, "float16").astype(np.float32))
    assert not np.array_equal(alone, mixed[1:])
    # |a|^2, |b|^2 < 65504 but 2 a.b = 78000 overflows: |a|^2 - inf + |b|^2 = -inf, max(-inf, 0) = 0,
    # finite, so ADM keeps float16 and reports 0 for a true squared distance of 100
    a, b = [[100.0, 100.0, 100.0, 100.0]], [[100.0, 100.0, 100.0, 90.0]]
    assert distance_block(a, b)[0, 0] == 0.0
    assert distance_block(a, b, "float32")[0, 0] == 100.0


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_batch_size_does_not_change_precision_recall(dtype):
    rng = np.random.default_rng(12)
    ref, sample = 2.0 * rng.normal(size=(150, 16)), 2.0 * rng.normal(size=(230, 16)) + 0.5
    radii = manifold_radii(sample, dtype=dtype)
    result = precision_recall(ref, sample, dtype=dtype)
    assert 0 < result[0] < 1 and 0 < result[1] < 1
    for batch_size in (4, 7, 64, 229):
        np.testing.assert_array_equal(manifold_radii(sample, batch_size=batch_size, dtype=dtype), radii)
        assert precision_recall(ref, sample, batch_size=batch_size, dtype=dtype) == result


def test_precision_recall_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="float16"):
        precision_recall(np.zeros((5, 2)), np.zeros((5, 2)), dtype="bfloat16")
