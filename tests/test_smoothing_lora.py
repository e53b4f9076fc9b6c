"""TAS smoothing factors and the alternating quantize / low-rank LoRA fit."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from quant.kernels import ops_avx512
from quant.method.lora import fit_lora
from quant.method.quantizer import dequantize_weight, quantize_weight
from quant.quant_config import WeightQuantConfig
from quant.search.candidates import Candidates
from quant.method.smoothing import RunningAbsMax, channel_absmax, smoothing_factors, weight_channel_absmax

torch.set_num_threads(1)


def _layer(out=128, inp=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[:, [3, 40, 77]] *= 10.0
    x = torch.randn(2, 10, inp, generator=g)
    x[..., [5, 60]] *= 25.0
    return w, x


def test_channel_statistics():
    w, x = _layer()
    assert torch.equal(channel_absmax(x), x.abs().reshape(-1, 96).max(0).values)
    assert torch.equal(weight_channel_absmax(w), w.abs().max(0).values)
    assert channel_absmax(x.half()).dtype == torch.float32


def test_running_absmax_is_temporal_max():
    xs = [torch.randn(3, 4, 8) * (t + 1) for t in range(4)]
    ram = RunningAbsMax()
    for x in xs:
        ram.update(x)
    assert ram.steps == 4
    assert torch.equal(ram.value, torch.cat(xs).abs().reshape(-1, 8).max(0).values)


def test_smoothing_factors_formula_and_stacked_alphas():
    a = torch.tensor([4.0, 0.5, 100.0])
    w = torch.tensor([0.25, 2.0, 0.01])
    for alpha in [0.0, 0.3, 0.5, 1.0]:
        expected = (a ** alpha / w ** (1 - alpha)).clamp(min=1e-4)
        torch.testing.assert_close(smoothing_factors(a, w, alpha), expected)
    stacked = smoothing_factors(a, w, [0.0, 0.5, 1.0])
    assert stacked.shape == (3, 3)
    torch.testing.assert_close(stacked[1], smoothing_factors(a, w, 0.5))
    torch.testing.assert_close(smoothing_factors(a, w, 0.5), (a / w).sqrt())


def test_smoothing_factors_degenerate_channels_are_finite():
    a = torch.tensor([0.0, 0.0, 3.0, 1.0])
    w = torch.tensor([0.0, 1.0, 0.0, 1.0])
    for alpha in [0.0, 0.05, 0.5, 0.95, 1.0]:
        s = smoothing_factors(a, w, alpha)
        assert torch.isfinite(s).all() and (s >= 1e-4).all(), alpha
        if alpha > 0:
            assert s[1] == pytest.approx(1e-4)  # dead activation channel: clamped to 1e-4


def released_factors(steps, q, alpha):
    """The released code's s, written out as it computes it: every step's activation maximum clamped at 1e-4,
    their running max, the quantized weight's column maximum clamped at 1e-4, s clamped at 1e-4."""
    a = None
    for x in steps:
        m = x.view(-1, x.shape[-1]).abs().max(dim=0)[0].clamp_(min=1e-4)
        a = m if a is None else torch.max(m, a)
    w = q.abs().max(dim=0)[0].clamp(min=1e-4)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-4)


def _near_zero_channels(seed=0):
    """Steps of a layer input and a weight with channels at and below the clamps: activation channel 0 dead,
    channel 1 at 3e-6, weight column 2 zero, column 3 at 2e-6, column 4 at 5e-5."""
    g = torch.Generator().manual_seed(seed)
    steps = [torch.randn(2, 6, 64, generator=g) * (t + 1) for t in range(3)]
    for x in steps:
        x[..., 0] = 0.0
        x[..., 1] = 3e-6 * torch.rand(2, 6, generator=g)
    w = torch.randn(64, 64, generator=g) * 0.05
    w[:, 2] = 0.0
    w[:, 3] = 2e-6 * torch.randn(64, generator=g)
    w[:, 4] = 5e-5 * torch.rand(64, generator=g)
    return steps, w


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.5, 0.75, 1.0])
def test_reference_floors_are_the_released_clamps(alpha):
    """--scheme reference: s is the released code's, clamps included, on channels at and below 1e-4; the ditas
    scheme keeps a_j unfloored and w_j floored at 1e-5, so the two differ exactly on those channels."""
    steps, w = _near_zero_channels()
    tas = RunningAbsMax()
    for x in steps:
        tas.update(x)
    ref = smoothing_factors(tas.value, weight_channel_absmax(w), alpha, "reference")
    torch.testing.assert_close(ref, released_factors(steps, w, alpha), rtol=1e-6, atol=0)
    ditas = smoothing_factors(tas.value, weight_channel_absmax(w), alpha, "ditas")
    a, wmax = tas.value, weight_channel_absmax(w)
    torch.testing.assert_close(ditas, (a.pow(alpha) / wmax.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-4),
                               rtol=1e-6, atol=0)
    near = (a < 1e-4) | (wmax < 1e-4)
    assert near.tolist()[:5] == [True, True, True, True, True] and not near[5:].any()
    torch.testing.assert_close(ref[~near], ditas[~near], rtol=1e-6, atol=0)  # elsewhere the schemes agree
    if 0 < alpha < 1:  # both floors act: every near-zero channel differs
        assert ((ref[near] - ditas[near]).abs() > 1e-3 * ref[near]).all()
    assert torch.equal(smoothing_factors(tas.value, wmax, alpha), ditas)  # ditas is the default


def test_reference_candidates_smooth_as_released():
    """The reference scheme's candidates: w_j from the quantized weight Q of the LoRA loop, both released
    clamps, every alpha of the grid."""
    steps, w = _near_zero_channels(seed=1)
    tas = RunningAbsMax()
    for x in steps:
        tas.update(x)
    alphas = [round(0.05 * k, 10) for k in range(21)]
    cfg = WeightQuantConfig(bits=4, group_size=None, scheme="reference")
    c = Candidates(w, None, tas.value, alphas, cfg, lora_rank=4, lora_iters=2, scheme="reference", svd="full")
    q = dequantize_weight(c.fit.qweight)
    assert (q.abs().max(0).values[[2, 3]] < 1e-4).all()  # Q keeps the near-zero columns near zero
    for k, alpha in enumerate(alphas):
        torch.testing.assert_close(c.smooth[k], released_factors(steps, q, 0.05 * k), rtol=1e-6, atol=0)


def test_smoothing_alone_keeps_linear_output():
    w, x = _layer()
    b = torch.randn(128)
    s = smoothing_factors(channel_absmax(x), weight_channel_absmax(w), 0.5)
    torch.testing.assert_close(F.linear(x / s, w * s, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme,group_size", [("ditas", 32), ("ditas", None), ("reference", None)])
def test_lora_fit_reduces_error(scheme, group_size):
    w, _ = _layer()
    cfg = WeightQuantConfig(bits=4, group_size=group_size, scheme=scheme)
    fit = fit_lora(w, partial(quantize_weight, cfg=cfg), rank=8, iters=10)
    errors = fit.errors.tolist()
    print(f"\n{scheme} g={group_size}: RTN {fit.rtn_error.item():.5f} -> LoRA " + " ".join(f"{e:.5f}" for e in errors))
    assert fit.L.shape == (128, 8) and fit.R.shape == (8, 96) and len(errors) == 10
    assert errors[-1] < 0.95 * fit.rtn_error.item()
    # reported values match the returned pieces
    assert errors[-1] == pytest.approx(torch.linalg.matrix_norm(w - fit.q - fit.L @ fit.R).item(), rel=1e-5)
    assert torch.equal(fit.q, dequantize_weight(fit.qweight))
    # the alternation is not guaranteed monotone (the quantizer's grid moves with its input):
    # per-channel/grouped ditas decreases, the reference grid may wobble by a fraction of a percent
    tol = 1e-3 if scheme == "ditas" else 1e-2
    assert all(b <= a * (1 + tol) for a, b in zip(errors, errors[1:])), errors


def test_lora_rank_zero_is_rtn_and_rank_checked():
    w, _ = _layer()
    qfn = partial(quantize_weight, cfg=WeightQuantConfig(bits=4, group_size=32))
    fit = fit_lora(w, qfn, rank=0)
    assert fit.L.shape == (128, 0) and fit.R.shape == (0, 96)
    assert torch.equal(fit.q, dequantize_weight(qfn(w)))
    assert fit.errors.tolist() == [fit.rtn_error.item()]
    with pytest.raises(ValueError, match="rank"):
        fit_lora(w, qfn, rank=97)
    with pytest.raises(ValueError, match="svd"):
        fit_lora(w, qfn, rank=4, svd="qr")


def test_lora_lowrank_svd_and_stacked_fit():
    w, _ = _layer()
    qfn = partial(quantize_weight, cfg=WeightQuantConfig(bits=3, group_size=32))
    fit = fit_lora(w, qfn, rank=8, iters=4, svd="lowrank")
    assert fit.errors[-1] < 0.95 * fit.rtn_error
    assert torch.linalg.matrix_rank(fit.L @ fit.R) <= 8
    # a stack of weights is fitted as independent problems
    ws = torch.stack([w, w * 0.5 + 0.01])
    stacked = fit_lora(ws, qfn, rank=4, iters=3)
    for k in range(2):
        single = fit_lora(ws[k], qfn, rank=4, iters=3)
        torch.testing.assert_close(stacked[k].effective, single.effective, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stacked.errors[:, k], single.errors, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("group_size", [32, None])
def test_subspace_fit_matches_the_full_svd(group_size):
    """The warm-started subspace SVD: the same alternating loop, its final error within 1 % of the full SVD's
    (this layer has outlier columns, so the quantization error has a few strong directions and a flat tail)."""
    w, _ = _layer()
    qfn = partial(quantize_weight, cfg=WeightQuantConfig(bits=4, group_size=group_size))
    full = fit_lora(w, qfn, rank=8, iters=10, svd="full")
    sub = fit_lora(w, qfn, rank=8, iters=10, svd="subspace")
    assert torch.equal(sub.rtn_error, full.rtn_error)  # the first Q is round-to-nearest either way
    assert float(sub.errors[-1]) <= 1.01 * float(full.errors[-1])
    assert float(sub.errors[-1]) < 0.95 * float(sub.rtn_error)
    assert sub.errors[-1] == pytest.approx(torch.linalg.matrix_norm(w - sub.q - sub.L @ sub.R).item(), rel=1e-5)
    assert sub.svds == full.svds == 10 and sub.basis.shape == (96, 8 + 16) and full.basis is None
    again = fit_lora(w, qfn, rank=8, iters=10, svd="subspace")  # seeded: deterministic
    assert torch.equal(again.L, sub.L) and torch.equal(again.qweight.codes, sub.qweight.codes)


def test_subspace_warm_start_from_a_neighbour():
    """A neighbouring weight's final basis starts the next fit; one fewer power-step warm-up, no worse a fit."""
    w, _ = _layer()
    qfn = partial(quantize_weight, cfg=WeightQuantConfig(bits=4, group_size=32))
    first = fit_lora(w, qfn, rank=8, iters=10, svd="subspace")
    w2 = w * torch.linspace(0.9, 1.1, w.shape[1])
    cold = fit_lora(w2, qfn, rank=8, iters=10, svd="subspace")
    warm = fit_lora(w2, qfn, rank=8, iters=10, svd="subspace", basis=first.basis)
    assert float(warm.errors[-1]) <= 1.01 * float(cold.errors[-1])
    assert not torch.equal(warm.L, cold.L)  # the basis was used
    stacked = fit_lora(torch.stack([w, w2]), qfn, rank=8, iters=3, svd="subspace")
    assert stacked.svds == 6 and stacked.basis.shape == (2, 96, 24)


@pytest.mark.skipif(ops_avx512.load() is None, reason="fused CPU kernel not available here")
@pytest.mark.parametrize("shape,group,svd", [((96, 64), 32, "subspace"), ((2, 48, 128), 16, "full"),
                                             ((40, 256), None, "subspace")])
def test_fused_quantize_residual_is_the_torch_ops(monkeypatch, shape, group, svd):
    """The LoRA loop's quantize-and-residual step in one C pass (csrc/weight_quant.c) is quant.method.quantizer's
    round-to-nearest bit for bit: the same codes, scales, zero points, factors and errors after the whole
    loop, including a constant group (rng 0) and an all-zero one (the scale fallbacks)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[-1], generator=g))
    w[..., 0, :16] = 0.25
    w[..., 1, :16] = 0.0
    cfg = WeightQuantConfig(bits=4, group_size=group)
    calls = []
    fused = ops_avx512.quant_residual
    monkeypatch.setattr(ops_avx512, "quant_residual", lambda *a: calls.append(1) or fused(*a))
    a = fit_lora(w, cfg, rank=4, iters=3, svd=svd)
    assert len(calls) == 3
    b = fit_lora(w, partial(quantize_weight, cfg=cfg), rank=4, iters=3, svd=svd)  # a callable: the torch ops
    assert len(calls) == 3
    for x, y in ((a.qweight.codes, b.qweight.codes), (a.qweight.scale, b.qweight.scale),
                 (a.qweight.zero, b.qweight.zero), (a.q, b.q), (a.L, b.L), (a.R, b.R), (a.errors, b.errors),
                 (a.rtn_error, b.rtn_error)):
        assert torch.equal(x, y)
    # where the kernel does not apply (symmetric weights, groups not a multiple of 16): the torch ops
    for other in (WeightQuantConfig(bits=4, group_size=group, symmetric=True), WeightQuantConfig(bits=4, group_size=8)):
        fit_lora(w, other, rank=4, iters=2, svd=svd)
    assert len(calls) == 3


def test_subspace_fit_of_an_exactly_representable_weight():
    """W on the quantization grid: W - Q = 0 has no subspace (the Gram route finds none and falls back to
    QR): a zero branch, zero errors, nothing undefined."""
    g = torch.Generator().manual_seed(0)
    cfg = WeightQuantConfig(bits=4, group_size=32)
    w = torch.randint(0, 16, (64, 64), generator=g).float()
    w[:, ::32], w[:, 1::32] = 0.0, 15.0  # every group spans [0, 15]: scale 1, zero point 0, codes = w
    fit = fit_lora(w, cfg, rank=4, iters=3, svd="subspace")
    assert torch.isfinite(fit.L).all() and torch.isfinite(fit.R).all() and torch.isfinite(fit.basis).all()
    assert float(fit.errors.abs().max()) == 0.0 and torch.equal(fit.q, w)
