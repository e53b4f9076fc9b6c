"""Streaming alpha search against an independent brute-force evaluation."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from helpers import search_problem
from quant.method.lora import fit_lora
from quant.nn.qlinear import QuantLinear
from quant.method.quantizer import dequantize_weight, fake_quantize_act, quantize_weight
from quant.quant_config import ActQuantConfig, WeightQuantConfig
from quant.kernels import ops_avx512
from quant.search.candidates import AlphaSearch, select_alpha
from quant.quant_config import alpha_grid
from quant.search.losses import LossEngine
from quant.method.smoothing import RunningAbsMax, smoothing_factors, weight_channel_absmax

torch.set_num_threads(1)
RANK, ITERS = 4, 3


def _brute_force(w, b, xs, alphas, wcfg, acfg, scheme):
    """Build each quantized layer with the public functions and sum the per-step losses."""
    a = RunningAbsMax()
    for x in xs:
        a.update(x)
    qfn = partial(quantize_weight, cfg=wcfg)
    if scheme == "reference":
        fit = fit_lora(w, qfn, rank=RANK, iters=ITERS)
    losses = []
    for alpha in alphas:
        if scheme == "reference":
            s = smoothing_factors(a.value, weight_channel_absmax(fit.q), alpha)
            total = 0.0
            for x in xs:
                xq = fake_quantize_act(x / s, acfg)
                y = xq @ (fit.q * s).T + (xq @ (fit.R * s).T) @ fit.L.T + b
                total += ((y - (x @ w.T + b)) ** 2).mean().item()
        else:
            s = smoothing_factors(a.value, weight_channel_absmax(w), alpha)
            fit = fit_lora(w * s, qfn, rank=RANK, iters=ITERS)
            total = 0.0
            for x in xs:
                y = fake_quantize_act(x / s, acfg) @ (fit.q + fit.L @ fit.R).T + b
                total += ((y - (x @ w.T + b)) ** 2).mean().item()
        losses.append(total)
    return losses


def _search(w, b, xs, alphas, wcfg, acfg, scheme, **kw):
    a = RunningAbsMax()
    for x in xs:
        a.update(x)
    search = AlphaSearch.of_layer(w, b, a.value, alphas, wcfg, acfg, lora_rank=RANK, lora_iters=ITERS, scheme=scheme,
                                  svd="full", **kw)  # full: _brute_force's fit_lora
    for x in xs:
        search.update(x)
    return search


def test_alpha_grid():
    grid = alpha_grid()
    assert len(grid) == 21 and grid[0] == 0.0 and grid[-1] == 1.0
    assert grid[3] == 0.15 and grid[7] == 0.35
    assert alpha_grid(0.25) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError):
        alpha_grid(0.3)


@pytest.mark.parametrize("scheme,granularity,group_size", [
    ("ditas", "row", 32), ("ditas", "tensor", None), ("reference", "tensor", None)])
def test_search_matches_brute_force(scheme, granularity, group_size):
    w, b, xs = search_problem()
    alphas = alpha_grid()
    wcfg = WeightQuantConfig(bits=4, group_size=group_size, scheme=scheme)
    acfg = ActQuantConfig(bits=6, granularity=granularity, scheme=scheme)
    search = _search(w, b, xs, alphas, wcfg, acfg, scheme)
    expected = _brute_force(w, b, xs, alphas, wcfg, acfg, scheme)
    best, losses = search.result()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-4, atol=0)
    assert best == alphas[min(range(len(alphas)), key=expected.__getitem__)]
    assert losses[alphas.index(best)] < losses[0] and losses[alphas.index(best)] < losses[-1]  # an interior optimum


def test_reference_weight_error_is_alpha_independent():
    w, b, xs = search_problem()
    wcfg, acfg = WeightQuantConfig(scheme="reference"), ActQuantConfig(scheme="reference")
    search = _search(w, b, xs, [0.2, 0.8], wcfg, acfg, "reference")
    c0, c1 = search.candidate(0), search.candidate(1)
    assert c0.weight_error_lora == c1.weight_error_lora
    assert torch.equal(c0.qweight.codes, c1.qweight.codes)


def test_chunked_candidates_match():
    w, b, xs = search_problem(steps=2)
    args = (w, b, xs, alpha_grid(0.1), WeightQuantConfig(bits=4, group_size=32), ActQuantConfig(granularity="row"), "ditas")
    torch.testing.assert_close(torch.tensor(_search(*args, chunk=4).losses), torch.tensor(_search(*args).losses),
                               rtol=1e-4, atol=0)


def test_ties_go_to_smaller_alpha():
    assert select_alpha([1.0, 0.5, 0.5], [0.9, 0.3, 0.1]) == 2
    assert select_alpha([0.5, 0.5], [0.0, None]) == 1
    assert select_alpha([0.2, 0.1, 0.3], [0.0, 0.5, 1.0]) == 1
    # an all-zero input: every candidate is exact, all losses tie at 0
    w, b, _ = search_problem()
    search = AlphaSearch.of_layer(w, b, torch.ones(64), [0.5, 0.2, 0.8], WeightQuantConfig(bits=4, group_size=32),
                                  ActQuantConfig(), lora_rank=RANK, lora_iters=ITERS)
    search.update(torch.zeros(2, 3, 64))
    assert search.result() == (0.2, [0.0, 0.0, 0.0])


def test_max_steps_ignores_later_updates():
    w, b, xs = search_problem(steps=3)
    wcfg, acfg = WeightQuantConfig(scheme="reference"), ActQuantConfig(scheme="reference")
    capped = _search(w, b, xs, [0.0, 0.5, 1.0], wcfg, acfg, "reference", max_steps=2)
    a = RunningAbsMax()
    for x in xs:
        a.update(x)
    two = AlphaSearch.of_layer(w, b, a.value, [0.0, 0.5, 1.0], wcfg, acfg, lora_rank=RANK, lora_iters=ITERS)
    for x in xs[:2]:
        two.update(x)
    assert capped.steps == 2 and capped.losses == two.losses


def test_no_smoothing_and_fixed_alpha_modes():
    w, b, xs = search_problem(steps=1)
    wcfg, acfg = WeightQuantConfig(bits=4, group_size=32), ActQuantConfig()
    plain = AlphaSearch.of_layer(w, b, None, [None], wcfg, acfg, lora_rank=RANK, lora_iters=ITERS, svd="full")
    plain.update(xs[0])
    best = plain.best()
    assert best.alpha is None and best.smooth is None
    y = fake_quantize_act(xs[0], acfg) @ (fit_lora(w, partial(quantize_weight, cfg=wcfg), RANK, ITERS).effective).T
    assert plain.losses[0] == pytest.approx(((y - xs[0] @ w.T) ** 2).mean().item(), rel=1e-4)
    fixed = _search(w, b, xs, [0.5], wcfg, acfg, "ditas")
    assert fixed.result()[0] == 0.5 and fixed.best().smooth.shape == (64,)
    with pytest.raises(RuntimeError):
        AlphaSearch.of_layer(w, b, None, [None], wcfg, acfg, lora_rank=0).result()


def _streams(scheme, granularity, shape, seed):
    """Two calibration inputs with per-channel scales, W4A8 configs of the scheme and their TAS statistic."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=g) * torch.exp(torch.randn(64, generator=g)) for _ in range(2)]
    wcfg = WeightQuantConfig(bits=4, group_size=32 if scheme == "ditas" else None, scheme=scheme)
    acfg = ActQuantConfig(bits=8, granularity=granularity, scheme=scheme)
    absmax = torch.stack([x.abs().amax(dim=tuple(range(x.dim() - 1))) for x in xs]).amax(0)
    return xs, wcfg, acfg, absmax


@pytest.mark.parametrize("scheme,granularity,shape", [
    ("reference", "tensor", (3, 37, 64)), ("reference", "row", (5, 7, 64)), ("reference", "token", (41, 64)),
    ("ditas", "row", (3, 37, 64)), ("ditas", "tensor", (2, 300, 64)), ("ditas", "row", (29, 64)),
    ("ditas", "token", (4, 9, 64))])
# reference: in < out (projected products, cross term), in == out (direct, cross term), in > out (direct, P added)
@pytest.mark.parametrize("out", [96, 64, 32])
def test_fast_update_matches_naive(scheme, granularity, shape, out):
    """The optimized update (range shortcut, row chunks, error form) gives the direct evaluation's losses."""
    w, b, _ = search_problem(out=out)
    xs, wcfg, acfg, absmax = _streams(scheme, granularity, shape, seed=5)
    losses = {}
    for impl, dtype, chunk in (("naive", "fp32", None), ("fast", "fp32", None), ("fast", "fp32", 5),
                               ("fast", "bf16", None)):
        search = AlphaSearch.of_layer(w, b, absmax, alpha_grid(0.1) + [None], wcfg, acfg, lora_rank=RANK,
                                      lora_iters=ITERS, impl=impl, matmul_dtype=dtype, chunk=chunk)
        for x in xs:
            search.update(x)
        losses[impl, dtype, chunk] = torch.tensor(search.losses)
    ref = losses["naive", "fp32", None]
    # the quantizer's own codes and float64 sums: float rounding only (tests/test_loss_exact.py)
    torch.testing.assert_close(losses["fast", "fp32", None], ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(losses["fast", "fp32", 5], ref, rtol=1e-6, atol=0)
    tol = 1e-3 if scheme == "reference" else 1e-4  # bf16 products: reference scheme only
    torch.testing.assert_close(losses["fast", "bf16", None], ref, rtol=tol, atol=0)


@pytest.mark.parametrize("scheme,granularity,shape", [
    ("reference", "tensor", (3, 37, 64)), ("reference", "row", (5, 7, 64)), ("reference", "token", (41, 64)),
    ("ditas", "row", (3, 37, 64)), ("ditas", "token", (4, 9, 64))])
def test_row_stride_scores_every_nth_row(scheme, granularity, shape):
    """row_stride=n: the mean squared error over rows 0, n, 2n, ... of the exactly quantized layer (ranges
    from the whole input); fast and naive agree, and it is an estimate of the exact (stride 1) loss."""
    w, b, _ = search_problem(out=96)
    xs, wcfg, acfg, absmax = _streams(scheme, granularity, shape, seed=7)
    losses = {}
    for impl, stride in (("naive", 3), ("fast", 3), ("naive", 1)):
        search = AlphaSearch.of_layer(w, b, absmax, alpha_grid(0.25), wcfg, acfg, lora_rank=RANK, lora_iters=ITERS,
                                      impl=impl, row_stride=stride)
        for x in xs:
            search.update(x)
        losses[impl, stride] = torch.tensor(search.losses)
    torch.testing.assert_close(losses["fast", 3], losses["naive", 3], rtol=1e-6, atol=0)
    assert not torch.allclose(losses["naive", 3], losses["naive", 1], rtol=1e-3)
    torch.testing.assert_close(losses["naive", 3], losses["naive", 1], rtol=0.5, atol=0)
    # brute force for one candidate: quantize the whole input, then average the strided rows' errors
    k = 2
    search = AlphaSearch.of_layer(w, b, absmax, alpha_grid(0.25), wcfg, acfg, lora_rank=RANK, lora_iters=ITERS)
    q = QuantLinear.from_search(search.candidate(k), acfg)
    with torch.no_grad():
        want = sum(((q(x) - F.linear(x, w, b)).reshape(-1, 96)[::3] ** 2).mean().item() for x in xs)
    assert losses["naive", 3][k].item() == pytest.approx(want, rel=1e-4)
    with pytest.raises(ValueError, match="row_stride"):
        AlphaSearch.of_layer(w, b, absmax, [0.5], wcfg, acfg, row_stride=0)


@pytest.mark.skipif(not ops_avx512.bf16_ok(), reason="fused bf16 search kernel not available here")
@pytest.mark.parametrize("granularity,shape", [("tensor", (3, 37, 64)), ("row", (5, 7, 64)), ("tensor", (2, 301, 63))])
@pytest.mark.parametrize("out", [96, 64, 32])
@pytest.mark.parametrize("stride", [1, 2])
def test_bf16_search_kernel_matches_torch_bf16(monkeypatch, granularity, shape, out, stride):
    """The C evaluation of the bf16 candidate products (quant/kernels/csrc/alpha_search_bf16.c) gives the torch bf16 path's
    losses: the same bf16 operands, summed in another order. Odd widths exercise the padded layouts."""
    w, b, _ = search_problem(out=out, inp=shape[-1])
    xs, wcfg, acfg, absmax = _streams("reference", granularity, shape[:-1] + (64,), seed=3)
    if shape[-1] != 64:
        g = torch.Generator().manual_seed(1)
        xs = [torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[-1], generator=g)) for _ in range(2)]
        absmax = torch.stack([x.abs().amax(dim=(0, 1)) for x in xs]).amax(0)
    losses = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(ops_avx512, "bf16_ok", lambda: False)
        search = AlphaSearch.of_layer(w, b, absmax, alpha_grid(0.1) + [None], wcfg, acfg, lora_rank=RANK,
                                      lora_iters=ITERS, matmul_dtype="bf16", row_stride=stride)
        assert ("m_packed" in search.engine.ops) == fused
        for x in xs:
            search.update(x)
        losses[fused] = torch.tensor(search.losses)
    # torch's bf16 product rounds its output to bf16 before it is squared (the C kernel keeps it float32): up to
    # ~1.5e-4 of these small losses; the bf16 rounding of the operands at ~1e-3 (test_fast_update_matches_naive)
    torch.testing.assert_close(losses[True], losses[False], rtol=3e-4, atol=0)
    assert int(losses[True].argmin()) == int(losses[False].argmin())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_single_candidate_direct_product(dtype):
    """One candidate (the RTN baseline: no smoothing, no LoRA) keeps no dense operands (it is evaluated
    from its codes, no projection) and still gives the direct evaluation's loss."""
    w, b, _ = search_problem(out=96)
    xs, wcfg, acfg, absmax = _streams("reference", "tensor", (3, 37, 64), seed=5)
    losses = []
    for impl in ("naive", "fast"):
        search = AlphaSearch.of_layer(w, b, None, [None], wcfg, acfg, lora_rank=0, impl=impl, matmul_dtype=dtype)
        for x in xs:
            search.update(x)
        losses.append(search.losses[0])
    assert search.engine.nbytes() == 0 and not search.engine.shared
    assert losses[1] == pytest.approx(losses[0], rel=1e-3 if dtype == "bf16" else 1e-6)


@pytest.mark.parametrize("scheme,granularity,group_size", [("ditas", "row", 32), ("reference", "tensor", None)])
def test_built_layer_reproduces_search_loss(scheme, granularity, group_size):
    """The QuantLinear built from a candidate is the layer that was scored: its output MSE on the same
    inputs is the search's loss, its smoothing factors are the candidate's, and best() is the minimum."""
    w, b, xs = search_problem()
    alphas = alpha_grid(0.25)
    wcfg = WeightQuantConfig(bits=4, group_size=group_size, scheme=scheme)
    acfg = ActQuantConfig(bits=6, granularity=granularity, scheme=scheme)
    search = _search(w, b, xs, alphas, wcfg, acfg, scheme)
    built = []
    for k in range(len(alphas)):
        q = QuantLinear.from_search(search.candidate(k), acfg)
        assert torch.equal(q.smooth, search.candidates.smooth[k])
        built.append(sum(((q(x) - F.linear(x, w, b)) ** 2).mean().item() for x in xs))
    torch.testing.assert_close(torch.tensor(search.losses), torch.tensor(built), rtol=1e-4, atol=0)
    best = search.best()
    assert best.alpha == alphas[min(range(len(alphas)), key=built.__getitem__)]


@pytest.mark.skipif(ops_avx512.load() is None, reason="fused CPU kernel not available here")
@pytest.mark.parametrize("granularity,shape", [("row", (3, 37, 64)), ("tensor", (2, 300, 64)), ("token", (4, 9, 64))])
def test_ditas_candidates_on_the_integer_kernel(monkeypatch, granularity, shape):
    """ditas W4A8 candidates are scored on the fused integer kernel (IntLinear's arithmetic): their losses
    are the float64 evaluation of the same quantized layers, as are the dequantized float32 path's; given the
    FP layer's own output (x W^T + b) instead of computing x W^T changes nothing beyond rounding."""
    w, b, _ = search_problem(out=96)
    xs, wcfg, acfg, absmax = _streams("ditas", granularity, shape, seed=11)
    alphas = alpha_grid(0.25) + [None]
    calls = []
    qgemm = ops_avx512.qgemm
    monkeypatch.setattr(ops_avx512, "qgemm", lambda *a, **k: calls.append(1) or qgemm(*a, **k))

    def losses(outputs=False):
        search = AlphaSearch.of_layer(w, b, absmax, alphas, wcfg, acfg, lora_rank=RANK, lora_iters=ITERS,
                                      svd="subspace")
        for x in xs:
            search.update(x, F.linear(x, w, b) if outputs else None)
        return search, torch.tensor(search.losses, dtype=torch.float64)

    search, kernel = losses()
    assert len(calls) == len(alphas) * len(xs)  # every candidate, every step
    _, kernel_y = losses(outputs=True)
    c = search.candidates
    truth = []
    for k in range(len(alphas)):
        L, R = c.lora(k)
        weff = dequantize_weight(c.qweight(k)).double() + L.double() @ R.double()
        truth.append(sum(((fake_quantize_act(x / c.smooth[k], acfg).double() @ weff.T
                           - x.double() @ w.double().T) ** 2).mean().item() for x in xs))
    truth = torch.tensor(truth, dtype=torch.float64)
    torch.testing.assert_close(kernel, truth, rtol=1e-5, atol=0)
    torch.testing.assert_close(kernel_y, truth, rtol=1e-5, atol=0)
    monkeypatch.setattr(LossEngine, "_kernel_ready", lambda self, x2: False)
    calls.clear()
    _, dequantized = losses()
    assert not calls
    torch.testing.assert_close(dequantized, truth, rtol=1e-5, atol=0)


def test_candidates_travel_without_the_fp_weight():
    """Candidates.on(None, None) (what another rank is sent) pickles without the FP weight and bias and
    leaves the original whole; put on the weight again it scores exactly as the original."""
    import io
    w, b, xs = search_problem()
    wcfg, acfg = WeightQuantConfig(bits=4, group_size=32), ActQuantConfig(bits=8, granularity="row")
    c = _search(w, b, xs, alpha_grid(0.25), wcfg, acfg, "ditas").candidates

    def pickled(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return len(buf.getvalue())
    bare = c.on(None, None)
    assert bare.weight is None and bare.bias is None and torch.equal(c.weight, w)
    assert pickled(c) - pickled(bare) >= (w.numel() + b.numel()) * 4
    back = bare.on(w, b)
    searches = [AlphaSearch(x, acfg) for x in (c, back)]
    for x in xs:
        for search in searches:
            search.update(x, x @ w.T + b)
    assert searches[0].losses == searches[1].losses


def test_subset_of_candidates_is_the_same_candidates():
    """Candidates.subset keeps the chosen candidates bit for bit (their own copies) and drops the rest."""
    w, b, xs = search_problem()
    wcfg, acfg = WeightQuantConfig(bits=4, group_size=32), ActQuantConfig(bits=8, granularity="row")
    search = _search(w, b, xs, alpha_grid(0.25), wcfg, acfg, "ditas")
    c = search.candidates
    sub = c.subset([3, 1])
    assert sub.alphas == [c.alphas[3], c.alphas[1]] and c.nbytes() * 2 == sub.nbytes() * len(c.alphas)
    for i, k in enumerate((3, 1)):
        a, s = c.layer(k), sub.layer(i)
        assert a.alpha == s.alpha and torch.equal(a.smooth, s.smooth) and torch.equal(a.lora_L, s.lora_L)
        assert torch.equal(a.qweight.codes, s.qweight.codes) and torch.equal(a.qweight.scale, s.qweight.scale)
        assert a.lora_errors == s.lora_errors and a.weight_error_rtn == s.weight_error_rtn
    assert sub.codes.data_ptr() != c.codes.data_ptr()
    with pytest.raises(ValueError, match="at least one"):
        c.subset([])


@pytest.mark.skipif(ops_avx512.load() is None, reason="fused CPU kernel not available here")
def test_integer_kernel_falls_back_where_zero_points_overflow_int32(monkeypatch):
    """Inputs far from 0 (activation zero points beyond the kernel's int32 bound for some candidates) are
    scored by the dequantized float path instead, with the direct evaluation's losses."""
    w, b, xs = search_problem(shift=1e7)
    wcfg, acfg = WeightQuantConfig(bits=4, group_size=32), ActQuantConfig(bits=8, granularity="row")
    calls = []
    qgemm = ops_avx512.qgemm
    monkeypatch.setattr(ops_avx512, "qgemm", lambda *a, **k: calls.append(1) or qgemm(*a, **k))
    fast = _search(w, b, xs, alpha_grid(0.5), wcfg, acfg, "ditas")
    naive = _search(w, b, xs, alpha_grid(0.5), wcfg, acfg, "ditas", impl="naive")
    assert len(calls) < len(alpha_grid(0.5)) * len(xs)  # some (candidate, step) fell back
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(naive.losses), rtol=2e-4, atol=0)


@pytest.mark.skipif(ops_avx512.load() is None, reason="fused CPU kernel not available here")
def test_integer_kernel_builds_weight_operands_once_per_search(monkeypatch):
    """Steps of many rows are scored in blocks; each candidate's kernel operands are built once for the
    whole search (not per step or block), counted in the engine's bytes, and the losses are the
    single-block ones."""
    from quant.search import losses as search_losses
    w, b, _ = search_problem(out=96)
    xs, wcfg, acfg, absmax = _streams("ditas", "row", (2, 300, 64), seed=11)
    alphas = alpha_grid(0.5)
    single = _search(w, b, xs, alphas, wcfg, acfg, "ditas")
    monkeypatch.setattr(search_losses, "_CHUNK_ELEMENTS", 64 * 64)  # 64-row blocks: 10 per step
    monkeypatch.setattr(search_losses, "_BLOCK_ELEMENTS", 64)
    built = []
    w4 = ops_avx512.w4_operands
    monkeypatch.setattr(ops_avx512, "w4_operands", lambda *a, **k: built.append(1) or w4(*a, **k))
    blocks = _search(w, b, xs, alphas, wcfg, acfg, "ditas")
    assert len(built) == len(alphas) and len(xs) > 1
    assert blocks.engine.nbytes() > 0  # counted (tests/test_budget.py: equal to the budget's formula)
    torch.testing.assert_close(torch.tensor(blocks.losses), torch.tensor(single.losses), rtol=1e-9, atol=0)


def test_candidates_class_is_chosen_once_by_the_scheme_and_lora_defaults_are_quantconfigs():
    """Candidates(...) is the scheme's class (also through copies and pickling, as the ranks send them); the LoRA
    settings left out are QuantConfig's for the scheme."""
    import copy
    import pickle

    from quant.quant_config import QuantConfig
    from quant.search.candidates import Candidates, DitasCandidates, ReferenceCandidates, lora_settings
    w, b, xs = search_problem(steps=1)
    a = RunningAbsMax().update(xs[0]).value
    ditas = Candidates(w, b, a, [0.5], WeightQuantConfig(bits=4, group_size=32), lora_rank=4, lora_iters=2)
    ref = Candidates(w, b, a, [0.5], WeightQuantConfig(bits=4, scheme="reference"), lora_rank=4, lora_iters=2)
    assert type(ditas) is DitasCandidates and type(ref) is ReferenceCandidates
    for c in (ditas, ref):
        for other in (copy.copy(c), pickle.loads(pickle.dumps(c)), c.on(None, None), c.subset([0])):
            assert type(other) is type(c) and other.nbytes() == c.nbytes()
    with pytest.raises(ValueError):
        DitasCandidates(w, b, a, [0.5], WeightQuantConfig(bits=4, group_size=32), scheme="reference")
    with pytest.raises(ValueError):
        Candidates(w, b, a, [0.5], WeightQuantConfig(bits=4, group_size=32), scheme="other")
    for scheme in ("ditas", "reference"):
        cfg = QuantConfig(scheme=scheme)
        assert lora_settings(scheme) == (cfg.lora_rank, cfg.lora_iters, cfg.svd)
    assert lora_settings("ditas", 0, 3, "full") == (0, 3, "full")
