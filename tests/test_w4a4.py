"""W4A4 beyond the paper (issue 30): the low-rank branch in SVDQuant's order (--lora-order svd_first,
quant/method/svd_branch.py) against brute-force references, the search scoring what it builds, the integer backend,
folding, the checkpoint round trip, and nothing changed when it is off."""
import copy
import importlib.util
import json
import math
import os

import pytest
import torch

from helpers import calib_loop, random_dit, search_problem
from quant.kernels import ops_avx512
from quant.calibration.driver import quantize_dit
from quant.io.checkpoint import load_quantized, planned_layers, save_quantized, skeleton
from quant.quant_config import ActQuantConfig, QuantConfig, WeightQuantConfig
from quant.method.fold import fold_smoothing
from quant.nn.int_linear import IntLinear, to_int_backend
from quant.nn.qlinear import QuantLinear
from quant.method.quantizer import dequantize_weight, fake_quantize_act, quantize_weight
from quant.search.candidates import AlphaSearch, Candidates
from quant.method.rotation import (BlockHadamard, RotatedGELU, block_rotate, block_size, fwht, hadamard_matrix,
                            rotate_dit)
from quant.io.storage import storage_plan
from quant.method.svd_branch import fit_svd_first

torch.set_num_threads(1)
KERNELS = ["torch", pytest.param("fused", marks=pytest.mark.skipif(
    ops_avx512.load() is None, reason=f"fused kernel: {ops_avx512.status()}")),
    pytest.param("triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                                    reason="triton not installed (tests run its CPU interpreter)"))]
META = {"model": "DiT-XS/2", "image_size": 8, "num_classes": 10, "vae": "none", "in_channels": 3}
CFG = QuantConfig(weight_bit=4, act_bit=4, group_size=32, lora_rank=4, smoothing="search", alpha_step=0.25,
                  lora_order="svd_first")


def _weight(out=96, inp=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[:, [2, 30]] *= 8.0
    return w + 0.3 * torch.randn(out, 1, generator=g) @ torch.randn(1, inp, generator=g)  # one strong direction


@pytest.mark.parametrize("svd", ["full", "lowrank"])
def test_svd_first_is_the_explicit_svd_then_round_to_nearest(svd):
    w = _weight()
    wcfg = WeightQuantConfig(bits=4, group_size=32)
    fit = fit_svd_first(w, wcfg, rank=6, svd=svd)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    best = (u[:, :6] * s[:6]) @ vh[:6]  # the best rank-6 approximation (Eckart-Young)
    lr = fit.L.double() @ fit.R.double()
    if svd == "full":  # float32 factors against a float64 SVD
        assert float((lr - best).norm()) <= 2e-6 * float(best.norm())
    else:  # randomized: as close to W as the best rank 6, to 1e-4
        assert float((w.double() - lr).norm()) <= (1 + 1e-4) * float(s[6:].norm())
    torch.testing.assert_close(fit.L.norm(dim=0), fit.R.norm(dim=1))  # sqrt(S) on both sides
    q = quantize_weight(w - fit.L @ fit.R, wcfg)  # the residual, quantized once
    assert torch.equal(fit.qweight.codes, q.codes) and torch.equal(fit.qweight.scale, q.scale)
    assert torch.equal(fit.q, dequantize_weight(q))
    err = float((w - fit.q - fit.L @ fit.R).norm())
    assert fit.errors.tolist() == pytest.approx([err], rel=1e-5)
    assert float(fit.rtn_error) == pytest.approx(float((w - dequantize_weight(quantize_weight(w, wcfg))).norm()),
                                                 rel=1e-6)
    assert err < float(fit.rtn_error)
    rtn = fit_svd_first(w, wcfg, rank=0)  # rank 0: plain round-to-nearest
    assert rtn.L.shape == (96, 0) and torch.equal(rtn.qweight.codes, quantize_weight(w, wcfg).codes)


def _svd_layer(a_bits=4, gran="row", seed=0, smooth=True):
    w = _weight(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    s = torch.exp(torch.randn(64, generator=g) * 0.5) if smooth else None
    fit = fit_svd_first(w * (1 if s is None else s), WeightQuantConfig(bits=4, group_size=32), rank=4)
    b = torch.randn(96, generator=g)
    return QuantLinear(fit.qweight, b, fit.L, fit.R, s, ActQuantConfig(a_bits, gran), lora_input="smoothed")


@pytest.mark.parametrize("gran", ["tensor", "row", "token"])
def test_quantlinear_feeds_the_branch_the_unquantized_smoothed_input(gran):
    layer = _svd_layer(gran=gran)
    x = search_problem()[2][0]
    xs = x / layer.smooth
    ref = fake_quantize_act(xs, layer.act_cfg) @ dequantize_weight(layer.qweight).T + layer.bias \
        + (xs @ layer.lora_R.T) @ layer.lora_L.T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
        residual = QuantLinear(layer.qweight, layer.bias, layer.lora_L, layer.lora_R, layer.smooth, layer.act_cfg)
        assert not torch.allclose(residual(x), ref, rtol=1e-4, atol=1e-4)  # the residual order feeds it fq(x/s)
    with pytest.raises(ValueError, match="lora_input"):
        QuantLinear(layer.qweight, lora_input="float")


@pytest.mark.parametrize("a_bits,gran", [(4, "row"), (4, "token"), (8, "row"), (8, "tensor")])
@pytest.mark.parametrize("impl", ["fast", "naive"])
def test_search_scores_the_layer_it_builds(a_bits, gran, impl):
    """Every candidate's summed loss is the built QuantLinear's mean squared error against the FP layer
    (8-bit: the fused scoring kernel, which feeds its LoRA the codes, must not be used)."""
    w, b, xs = search_problem()
    absmax = torch.stack([x.abs().reshape(-1, x.shape[-1]).amax(0) for x in xs]).amax(0)
    acfg = ActQuantConfig(a_bits, gran)
    search = AlphaSearch.of_layer(w, b, absmax, [0.25, 0.5, 1.0], WeightQuantConfig(bits=4, group_size=32), acfg,
                                 lora_rank=4, impl=impl, lora_order="svd_first")
    for x in xs:
        search.update(x)
    for k in range(3):
        layer = QuantLinear.from_search(search.candidate(k), acfg)
        assert layer.lora_input == "smoothed" and layer.lora_R.shape == (4, 64)
        with torch.no_grad():
            want = sum(float((layer(x) - (x @ w.T + b)).pow(2).mean()) for x in xs)
        assert search.losses[k] == pytest.approx(want, rel=2e-5)


def test_approximate_search_noise_passes_through_q_alone():
    w, b, xs = search_problem()
    absmax = torch.stack([x.abs().reshape(-1, x.shape[-1]).amax(0) for x in xs]).amax(0)
    wcfg = WeightQuantConfig(bits=4, group_size=32)
    first = Candidates(w, b, absmax, [0.5], wcfg, lora_rank=4, lora_order="svd_first")
    resid = Candidates(w, b, absmax, [0.5], wcfg, lora_rank=4, lora_iters=2)
    torch.testing.assert_close(first.noisy_weight(0), dequantize_weight(first.qweight(0)))
    torch.testing.assert_close(resid.noisy_weight(0), resid.smoothed_weight(0))
    assert first.layer(0).lora_input == "smoothed" and resid.layer(0).lora_input == "quantized"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("a_bits,gran", [(4, "row"), (4, "token"), (8, "tensor")])
def test_int_backend_runs_the_branch_on_the_same_codes(kernel, a_bits, gran):
    layer = _svd_layer(a_bits=a_bits, gran=gran)
    il = IntLinear.from_quantlinear(layer, kernel)
    assert il.lora_R.shape[0] == 0 and il.branch_R.shape == (4, 64)  # the kernel runs Q alone
    x = search_problem()[2][1]
    with torch.no_grad():
        ref, y = layer(x), il(x)
        # the kernel's part is the fake layer without its branch: the same activation and weight codes
        xs = x / layer.smooth
        branch = (xs @ layer.lora_R.T) @ layer.lora_L.T
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(y - branch, ref - branch, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="no fused activation"):
        IntLinear.from_quantlinear(layer, kernel, activation="gelu_tanh")


@pytest.fixture(scope="module")
def quantized():
    model = random_dit()
    report = quantize_dit(model, CFG, calib_loop(model, 2, 2), progress=False)
    return model, report


def _inputs(n=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 10, (n,), generator=g))


def test_calibrated_model_uses_the_branch_and_folds_exactly(quantized):
    model = copy.deepcopy(quantized[0])
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 4 * len(model.blocks) and all(m.lora_input == "smoothed" for m in qls)
    for m in qls:  # activation quantization off: folding is exact up to float rounding
        m.act_cfg = None
    x, t, y = _inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        got = fold_smoothing(copy.deepcopy(model))(x, t, y)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_int_backend_of_a_calibrated_model(quantized):
    model = fold_smoothing(copy.deepcopy(quantized[0]))
    x, t, y = _inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        intm = to_int_backend(copy.deepcopy(model), "torch")
        got = intm(x, t, y)
    assert all(b.mlp.fc1.activation is None for b in intm.blocks)  # GELU not fused: the branch comes first
    assert float((got - ref).norm() / ref.norm()) < 1e-4


def test_checkpoint_round_trip(quantized, tmp_path):
    model, report = copy.deepcopy(quantized[0]), quantized[1]
    out = save_quantized(model, dict(META, **CFG.to_dict()), report, str(tmp_path / "q"))
    loaded, meta = load_quantized(out)
    assert meta["lora_order"] == "svd_first"
    assert all(info["lora_input"] == "smoothed" for info in meta["layers"].values())
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))
    assert all(m.lora_input == "smoothed" for m in loaded.modules() if isinstance(m, QuantLinear))
    assert storage_plan(skeleton(META, planned_layers(random_dit(), CFG))) == storage_plan(model)


def test_off_by_default_writes_what_it_wrote_before(tmp_path):
    """The default order records nothing new: the config dict, the layer layout and the files are those of a
    config that never heard of it."""
    base = QuantConfig(weight_bit=4, act_bit=4, group_size=32, lora_rank=4, lora_iters=2, smoothing="search",
                       alpha_step=0.5)
    assert "lora_order" not in base.to_dict() and "hadamard" not in base.to_dict()
    assert base == QuantConfig(**base.to_dict(), lora_order="residual", hadamard=False)
    dirs = []
    for i in range(2):
        model = random_dit()
        report = quantize_dit(model, base, calib_loop(model, 2, 2), progress=False)
        assert all(m.lora_input == "quantized" for m in model.modules() if isinstance(m, QuantLinear))
        dirs.append(save_quantized(model, dict(META, **base.to_dict()), {}, str(tmp_path / f"q{i}")))
        del report
    meta = json.load(open(os.path.join(dirs[0], "quant_config.json")))
    assert "lora_order" not in meta and not any("lora_input" in info for info in meta["layers"].values())
    for name in ("model.safetensors", "quant_config.json"):
        assert open(os.path.join(dirs[0], name), "rb").read() == open(os.path.join(dirs[1], name), "rb").read()


def test_config_checks():
    with pytest.raises(ValueError, match="ditas-scheme"):
        QuantConfig(scheme="reference", lora_order="svd_first")
    with pytest.raises(ValueError, match="lora-iters"):
        QuantConfig(lora_order="svd_first", lora_iters=3)
    with pytest.raises(ValueError, match="lora order"):
        QuantConfig(lora_order="svdquant")


# ------------------------------------------------------------------------ Hadamard rotation (--hadamard)

def _sylvester(b):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(b)


@pytest.mark.parametrize("n,block", [(8, 8), (64, 32), (384, 128), (72, 8), (1, 1)])
def test_fwht_is_the_dense_block_hadamard(n, block):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    dense = torch.block_diag(*[_sylvester(block)] * (n // block))
    torch.testing.assert_close(fwht(x, block), x @ dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(fwht(fwht(x, block), block), x, rtol=0, atol=1e-12)  # H H = I
    torch.testing.assert_close(block_rotate(x, hadamard_matrix(block, torch.float64)), x @ dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(BlockHadamard(block)(x.float()), (x @ dense).float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(RotatedGELU(block)(x.float()), (torch.nn.functional.gelu(x, approximate="tanh")
                                                               @ dense).float(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="power of two dividing"):
        fwht(x, 3 if n % 3 == 0 else 2 * n)


def test_block_sizes_at_dit_shapes():
    assert [block_size(n) for n in (64, 72, 128, 512, 1152, 4608, 96)] == [64, 8, 128, 128, 128, 128, 32]


def _capture(model, names, x, t, y):
    got = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: got.__setitem__(n, a[0].clone())) for n in names]
    try:
        with torch.no_grad():
            out = model(x, t, y)
    finally:
        for h in hooks:
            h.remove()
    return got, out


def test_rotation_keeps_the_fp_model_and_rotates_the_layer_inputs():
    model = random_dit()
    rotated = copy.deepcopy(model)
    sizes = rotate_dit(rotated)
    assert sizes == {"blocks.0.attn.proj": 32, "blocks.0.mlp.fc2": 128, "blocks.1.attn.proj": 32,
                     "blocks.1.mlp.fc2": 128}
    names = list(sizes)
    x, t, y = _inputs()
    ref_in, ref = _capture(model, names, x, t, y)
    got_in, got = _capture(rotated, names, x, t, y)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))  # the same function
    for n in names:  # each layer now sees its input times the block Hadamard (proj's folded into qkv's V rows)
        dense = torch.block_diag(*[_sylvester(sizes[n])] * (ref_in[n].shape[-1] // sizes[n])).float()
        torch.testing.assert_close(got_in[n], ref_in[n] @ dense, rtol=1e-4, atol=1e-5 * float(ref_in[n].abs().max()))
    with pytest.raises(ValueError, match="rotated twice"):
        rotate_dit(rotated)


HCFG = QuantConfig(weight_bit=4, act_bit=4, group_size=32, lora_rank=4, smoothing="search", alpha_step=0.25,
                   lora_order="svd_first",
                   hadamard=True, act_granularity="token")


@pytest.fixture(scope="module")
def rotated_quantized():
    model = random_dit()
    report = quantize_dit(model, HCFG, calib_loop(model, 2, 2), progress=False)
    return model, report


def test_hadamard_checkpoint_round_trip_and_int_backend(rotated_quantized, tmp_path):
    model, report = copy.deepcopy(rotated_quantized[0]), rotated_quantized[1]
    assert all(isinstance(b.mlp.act, RotatedGELU) for b in model.blocks)
    out = save_quantized(model, dict(META, **HCFG.to_dict()), report, str(tmp_path / "q"))
    loaded, meta = load_quantized(out)
    assert meta["hadamard"] is True and all(isinstance(b.mlp.act, RotatedGELU) for b in loaded.blocks)
    x, t, y = _inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        assert torch.equal(loaded(x, t, y), ref)
        folded = fold_smoothing(loaded)
        intm = to_int_backend(copy.deepcopy(folded), "torch")
        fake = folded(x, t, y)
        got = intm(x, t, y)
    # svd_first: fc1's branch is added after its kernel, so GELU and rotation stay together as the act
    assert all(type(b.mlp.act) is RotatedGELU and b.mlp.act.block == 128 and b.mlp.fc1.activation is None
               for b in intm.blocks)
    assert float((got - fake).norm() / fake.norm()) < 1e-4


def test_hadamard_fc1_gelu_fusion_keeps_the_rotation():
    """With the residual LoRA fc1's GELU moves into its integer epilogue and the rotation stays as the act."""
    cfg = QuantConfig(weight_bit=4, act_bit=8, group_size=32, lora_rank=2, lora_iters=1, smoothing="search",
                      alpha_step=0.5,
                      hadamard=True)
    model = random_dit()
    quantize_dit(model, cfg, calib_loop(model, 2, 2), progress=False)
    model = fold_smoothing(model)
    x, t, y = _inputs()
    with torch.no_grad():
        fake = model(x, t, y)
        intm = to_int_backend(copy.deepcopy(model), "torch")
        got = intm(x, t, y)
    assert all(b.mlp.fc1.activation == "gelu_tanh" and type(b.mlp.act) is BlockHadamard for b in intm.blocks)
    assert float((got - fake).norm() / fake.norm()) < 1e-4
