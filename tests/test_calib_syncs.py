"""Calibration's host syncs (aten::_local_scalar_dense: .item(), float(t), ...) do not grow with the row chunks.

The loss engine (quant/search/losses.py) accumulates every candidate's squared error on the device; a layer's
sums are read back once, when its search reports. On a GPU each such read is a blocking sync, so the tests
here run steps cut into many row chunks and hold the count to a constant per layer and step, on the torch-op
path (what CUDA runs; the fused CPU kernel switched off) and on the fused CPU kernel where it loads.
"""
import pytest
import torch

from helpers import HostSyncs, calib_loop, random_dit
from quant.kernels import ops_avx512
from quant.search import losses as search_losses
from quant.quant_config import QuantConfig
from quant.calibration.driver import quantize_dit
from quant.method.layers import quantizable_layers
from quant.method.quantizer import dequantize_weight, fake_quantize_act
from quant.quant_config import ActQuantConfig, WeightQuantConfig
from quant.search.candidates import AlphaSearch, Candidates

from quant.quant_config import alpha_grid

IN, OUT = 64, 96
FUSED = pytest.mark.skipif(ops_avx512.load() is None, reason="fused CPU kernel not available here")


@pytest.fixture
def small_chunks(monkeypatch):
    """CPU row chunks of 64 rows (own-weight path) and 16 (reference path), blocks of 64 rows."""
    monkeypatch.setattr(search_losses, "_CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(search_losses, "_BLOCK_ELEMENTS", 64)


def _without_kernels(monkeypatch):
    """The torch-op path, as on CUDA: no fused CPU kernel (neither the integer nor the bf16 one; bf16_ok is
    cached, so it is replaced too rather than called while load is)."""
    monkeypatch.setattr(ops_avx512, "load", lambda: None)
    monkeypatch.setattr(ops_avx512, "bf16_ok", lambda: False)


@pytest.fixture
def torch_ops(monkeypatch):
    _without_kernels(monkeypatch)


def _layer(seed=0, rows=(4, 300)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=g) * 0.05
    b = torch.randn(OUT, generator=g) * 0.1
    xs = [torch.randn(*rows, IN, generator=g) * torch.exp(torch.randn(IN, generator=g)) for _ in range(3)]
    return w, b, xs


def _searches(scheme, granularity, dtype="fp32", lora_rank=4):
    """(candidates' search, round-to-nearest baseline's search, inputs) of one layer."""
    w, b, xs = _layer()
    wcfg = WeightQuantConfig(bits=4, group_size=32 if scheme == "ditas" else None, scheme=scheme)
    acfg = ActQuantConfig(bits=8, granularity=granularity, scheme=scheme)
    absmax = torch.stack([x.abs().amax((0, 1)) for x in xs]).amax(0)
    cands = Candidates(w, b, absmax, alpha_grid(0.25), wcfg, lora_rank, 2)
    base = Candidates(w, b, None, [None], wcfg, lora_rank=0)
    return [AlphaSearch(c, acfg, matmul_dtype=dtype) for c in (cands, base)], xs


def _step_syncs(searches, xs):
    """Host syncs of each update (one step of the layer, with the FP output as the reference, as calibration
    passes it) and of reading every search's sums back."""
    per_step = []
    for x in xs:
        y = x @ searches[0].candidates.weight.T + searches[0].candidates.bias
        with HostSyncs() as syncs:
            for s in searches:
                s.update(x, y)
        per_step.append(syncs.count)
    with HostSyncs() as syncs:
        losses = [s.losses for s in searches]
    return per_step, syncs.count, losses


CASES = [("ditas", "row", "fp32"), ("ditas", "token", "fp32"), ("ditas", "tensor", "fp32"),
         ("reference", "tensor", "fp32"), ("reference", "row", "bf16"), ("reference", "token", "fp32")]


def _chunks_per_step(scheme, rows, n_alphas):
    """Row chunks of a step on the CPU: the own-weight path's, the reference path's (every candidate at once)."""
    own = rows // max(64, search_losses.chunk_elements("cpu") // IN)
    shared = rows // max(16, search_losses.chunk_elements("cpu") // (n_alphas * IN))
    return shared if scheme == "reference" else own


@pytest.mark.parametrize("scheme,granularity,dtype", CASES)
def test_no_sync_per_chunk_on_the_torch_path(small_chunks, torch_ops, scheme, granularity, dtype):
    searches, xs = _searches(scheme, granularity, dtype)
    assert _chunks_per_step(scheme, xs[0].numel() // IN, len(searches[0].alphas)) >= 18  # many chunks per step
    per_step, readback, _ = _step_syncs(searches, xs)
    assert per_step == [0] * len(xs)  # the sums stay on the device
    assert readback <= len(searches)  # at most one read per search (none on a CPU: tolist is no dispatch)


@FUSED
@pytest.mark.parametrize("scheme,granularity,dtype", [c for c in CASES if c[0] == "ditas" or c[2] == "bf16"])
def test_no_sync_per_chunk_on_the_fused_cpu_kernel(monkeypatch, small_chunks, scheme, granularity, dtype):
    if dtype == "bf16" and not ops_avx512.bf16_ok():
        pytest.skip("no AVX512-BF16 here")
    calls = []
    for name in ("qgemm", "ref_losses"):
        fn = getattr(ops_avx512, name)
        monkeypatch.setattr(ops_avx512, name, lambda *a, _fn=fn, **k: calls.append(1) or _fn(*a, **k))
    searches, xs = _searches(scheme, granularity, dtype)
    per_step, readback, _ = _step_syncs(searches, xs)
    assert len(calls) >= 18 * len(xs)  # the kernel ran, block by block (or chunk by chunk)
    # the first step builds each candidate's kernel operands (ops_avx512.w4_operands: 4 reads each, once)
    candidates = sum(len(s.alphas) for s in searches)
    assert per_step[0] <= 4 * candidates and per_step[1:] == [0] * (len(xs) - 1), per_step
    assert readback <= len(searches)


def _per_chunk_float_losses(cands, acfg, xs, step):
    """What the engine summed before it accumulated on the device: per candidate and step, the squared error of
    each chunk of `step` rows read back as a Python float and added up, then divided by rows x out (no LoRA)."""
    total = [0.0] * len(cands.alphas)
    for x in xs:
        y = (x @ cands.weight.T + cands.bias).reshape(-1, OUT)
        for k in range(len(cands.alphas)):
            xq = fake_quantize_act(x / cands.smooth[k], acfg).reshape(-1, IN)
            q = dequantize_weight(cands.qweight(k)).float()
            acc = 0.0
            for r0 in range(0, xq.shape[0], step):
                z = torch.addmm(cands.bias, xq[r0:r0 + step], q.T)
                acc += float(torch.linalg.vector_norm(z - y[r0:r0 + step], dim=1).double().pow(2).sum())
            total[k] += acc / (xq.shape[0] * OUT)
    return total


@pytest.mark.parametrize("granularity", ["row", "token"])
def test_device_sums_equal_the_per_chunk_float_sums(small_chunks, torch_ops, granularity):
    """Bit for bit: a Python float is a double, and the same doubles are added in the same order."""
    searches, xs = _searches("ditas", granularity, lora_rank=0)
    _, _, (losses, base) = _step_syncs(searches, xs)
    acfg = ActQuantConfig(bits=8, granularity=granularity, scheme="ditas")
    assert losses == _per_chunk_float_losses(searches[0].candidates, acfg, xs, 64)
    assert base == _per_chunk_float_losses(searches[1].candidates, acfg, xs, 64)


def test_chunk_sizes_per_device():
    """CPU chunks stay cache-sized; elsewhere they are larger, and bounded (the budget's workspace follows)."""
    from quant.calibration.budget import workspace_bytes
    assert search_losses.chunk_elements("cpu") == search_losses._CHUNK_ELEMENTS
    cuda = search_losses.chunk_elements("cuda")
    assert cuda == search_losses._DEVICE_CHUNK_ELEMENTS > 16 * search_losses._CHUNK_ELEMENTS
    assert search_losses.rows_per_block(4608, 1152, "cuda") > search_losses.rows_per_block(4608, 1152)
    cfg = QuantConfig()
    for out, inp in ((3456, 1152), (1152, 1152), (4608, 1152), (1152, 4608)):  # DiT-XL/2 at 256 px, 16 labels x 2
        cpu, cuda = workspace_bytes(out, inp, 8192, cfg), workspace_bytes(out, inp, 8192, cfg, "cuda")
        assert cpu < cuda < 2 ** 30


@pytest.mark.parametrize("kernel", ["torch", pytest.param("fused", marks=FUSED)])
@pytest.mark.parametrize("flags", [{}, {"search": "exact"}, {"scheme": "reference"}])
def test_whole_calibration_pays_a_constant_per_layer_and_step(monkeypatch, kernel, flags):
    """quantize_dit on a random DiT-XS/2: the syncs of the scoring pass (its FP loop, the layers' updates in its
    hooks) stay within one per layer and step (plus, on the fused kernel, its operands once per candidate), and
    the whole calibration's count is the same with cache-sized chunks and with 16-64-row ones (many per step:
    512 rows)."""
    if kernel == "torch":
        _without_kernels(monkeypatch)
    steps, labels = 3, 16
    cfg = QuantConfig(group_size=32, lora_rank=4, lora_iters=2, smoothing="search", alpha_step=0.25, **flags)
    counts = []
    for elements in (search_losses._CHUNK_ELEMENTS, 64):
        monkeypatch.setattr(search_losses, "_CHUNK_ELEMENTS", elements)
        monkeypatch.setattr(search_losses, "_BLOCK_ELEMENTS", min(elements, search_losses._BLOCK_ELEMENTS))
        model = random_dit()
        loop, passes = calib_loop(model, steps, labels), []

        def counted():
            with HostSyncs() as syncs:
                loop()
            passes.append(syncs.count)
        with HostSyncs() as total:
            quantize_dit(model, cfg, counted, progress=False)
        counts.append((total.count, passes))
    with HostSyncs() as fp_loop:  # the FP sampling loop's own syncs, without any hook
        calib_loop(random_dit(), steps, labels)()
    layers = len(quantizable_layers(random_dit()))
    assert counts[0] == counts[1], counts  # no sync depends on the number of chunks
    held = (cfg.search_shortlist if cfg.search == "shortlist" else len(cfg.alphas())) + 1  # and the baseline
    once = 4 * held if kernel == "fused" else 0  # per layer: the kernel's operands, once per candidate
    assert max(counts[1][1]) - fp_loop.count <= layers * (steps + once), (counts, fp_loop.count)
