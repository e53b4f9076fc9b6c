"""Integer backend: exact int8 GEMMs, the shared activation quantizer, IntLinear == QuantLinear."""
import os

import pytest
import torch
import torch.nn as nn

from helpers import int_input, int_layer, quantize_blocks
from quant.kernels import ops_avx512, ops_torch
from quant.nn.int_linear import IntLinear, linear_w4a8, linear_w8a8, to_int_backend
from quant.kernels.ops_torch import int8_matmul, quantize_act_int8
from quant.method.quantizer import affine_params
from quant.nn.qlinear import QuantLinear
from quant.search.candidates import quantize_linear
from quant.method.quantizer import pack_int4, quantize_act, quantize_weight, scale_qweight_rows
from quant.quant_config import ActQuantConfig, WeightQuantConfig

torch.set_num_threads(1)

# every IntLinear test runs on both kernels: torch._int_mm + torch ops, and quant/kernels/csrc/int_linear.c
KERNELS = ["torch", pytest.param("fused", marks=pytest.mark.skipif(
    ops_avx512.load() is None, reason=f"fused kernel: {ops_avx512.status()}"))]


def _rel(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def _qlinear(k=256, n=192, **kwargs):
    return int_layer(k, n, **kwargs)


def _x(shape=(3, 40, 256), seed=1, kind="outliers"):
    return int_input(shape, seed, kind)


# ---------------------------------------------------------------------------
# int8 GEMM
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 8, 8), (5, 7, 3), (17, 64, 40), (64, 768, 96), (33, 130, 17)])
def test_int8_matmul_exact(m, k, n):
    g = torch.Generator().manual_seed(m * k + n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=g)
    out = int8_matmul(a, b)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out.long(), a.long() @ b.long())


def test_int8_matmul_extremes_and_layouts():
    k = 4096  # worst case magnitude and pairs that would saturate an int16 pair sum
    a = torch.full((20, k), -128, dtype=torch.int8)
    a[:, 1::3] = 127
    b = torch.full((k, 24), -128, dtype=torch.int8)
    b[1::2] = 127
    assert torch.equal(int8_matmul(a, b).long(), a.long() @ b.long())
    big = torch.randint(-128, 128, (64, 200), dtype=torch.int8)
    bt = torch.randint(-128, 128, (50, 128), dtype=torch.int8).t()  # non-contiguous both sides
    assert torch.equal(int8_matmul(big[:, :128], bt).long(), big[:, :128].long() @ bt.long())
    assert int8_matmul(torch.zeros(0, 8, dtype=torch.int8), torch.zeros(8, 4, dtype=torch.int8)).shape == (0, 4)


def test_int8_matmul_fallback_exact_and_errors():
    a = torch.randint(-128, 128, (9, 300), dtype=torch.int8)
    b = torch.randint(-128, 128, (300, 11), dtype=torch.int8)
    assert torch.equal(ops_torch._int_mm_reference(a, b).long(), a.long() @ b.long())
    with pytest.raises(ValueError, match="int8"):
        int8_matmul(a.to(torch.uint8), b)
    with pytest.raises(ValueError, match="shapes"):
        int8_matmul(a, b[:10])


# ---------------------------------------------------------------------------
# activation quantizer
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("gran", ["tensor", "row", "token"])
@pytest.mark.parametrize("shape", [(3, 40, 64), (2, 3, 5, 64), (40, 64), (64,)])
@pytest.mark.parametrize("bits", [8, 6])
def test_quantize_act_int8_matches_quantizer(gran, shape, bits):
    cfg = ActQuantConfig(bits, gran)
    x = _x(shape)
    codes, scale, zero = quantize_act(x, cfg)
    a, t, s2, z2 = quantize_act_int8(x.reshape(-1, 64), cfg, ops_torch.batch_of(x.shape, gran))
    assert a.dtype == torch.int8
    assert torch.equal(a.long() + 128, codes.reshape(-1, 64).long())
    assert torch.equal(t, a.float())
    assert torch.equal(torch.broadcast_to(s2, (a.shape[0], 1)).reshape(-1),
                       torch.broadcast_to(scale, x.shape)[..., 0].reshape(-1))
    assert torch.equal(torch.broadcast_to(z2, (a.shape[0], 1)).reshape(-1),
                       torch.broadcast_to(zero, x.shape)[..., 0].reshape(-1))


# ---------------------------------------------------------------------------
# IntLinear == QuantLinear
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group", [(8, None), (8, 64), (4, 64), (4, 128)])
@pytest.mark.parametrize("gran", ["tensor", "row", "token"])
@pytest.mark.parametrize("rank", [0, 8])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
def test_intlinear_matches_fake(bits, group, gran, rank, smooth, kernel):
    ql = _qlinear(bits=bits, group=group, gran=gran, rank=rank, smooth=smooth)
    il = IntLinear.from_quantlinear(ql, kernel)
    assert il.packed == (bits <= 4) and il.fused == (kernel == "fused")
    for kind in ("outliers", "gelu"):
        x = _x(kind=kind)
        with torch.no_grad():
            ref, y = ql(x), il(x)
        assert y.shape == ref.shape and y.dtype == ref.dtype
        assert _rel(y, ref) < 1e-4, (kind, _rel(y, ref))
        assert (y - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("bits,group,gran,smooth", [(8, None, "row", False), (4, 64, "token", True),
                                                   (8, 128, "tensor", True), (4, None, "row", True)])
@pytest.mark.parametrize("kernel", KERNELS)
def test_intlinear_low_precision_input_reads_the_same_codes(bits, group, gran, smooth, kernel):
    """bf16/fp16 input (a bf16 model): the integer part is the float32 path's on the upcast input;
    only the output is rounded to the input dtype."""
    ql = _qlinear(k=256, n=192, bits=bits, group=group, gran=gran, rank=8, smooth=smooth)
    il = IntLinear.from_quantlinear(ql, kernel)
    for dt in (torch.bfloat16, torch.float16):
        xl = _x().to(dt)
        xf = xl.float()
        codes_l = quantize_act_int8(xl.reshape(-1, 256), ql.act_cfg, batch=3)
        codes_f = quantize_act_int8(xf.reshape(-1, 256), ql.act_cfg, batch=3)
        assert torch.equal(codes_l[0], codes_f[0]) and torch.equal(codes_l[2], codes_f[2])
        with torch.no_grad():
            yl, yf = il(xl), il(xf)
        assert yl.dtype == dt and yl.shape == yf.shape
        # rounding of the output to dt, nothing more
        assert _rel(yl.float(), yf) < 2 * torch.finfo(dt).eps, (dt, _rel(yl.float(), yf))
        assert _rel(yf, ql(xf)) < 1e-4


@pytest.mark.parametrize("bits,group,sym,a_bits,act_scheme", [
    (3, 32, False, 8, "ditas"), (4, None, True, 8, "ditas"), (8, 32, True, 6, "ditas"),
    (6, 64, False, 7, "ditas"), (2, 16, False, 8, "ditas"), (4, 64, False, 8, "reference")])
@pytest.mark.parametrize("kernel", KERNELS)
def test_intlinear_other_bit_widths_and_symmetric(bits, group, sym, a_bits, act_scheme, kernel):
    """Any weight bits 2..8, symmetric weights, A < 8, and the reference activation quantizer (2^A steps)."""
    ql = _qlinear(bits=bits, group=group, symmetric=sym, a_bits=a_bits, act_scheme=act_scheme, rank=4, bias=False)
    il = IntLinear.from_quantlinear(ql, kernel)
    x = _x()
    with torch.no_grad():
        assert _rel(il(x), ql(x)) < 1e-4


@pytest.mark.parametrize("kernel", KERNELS)
def test_intlinear_input_layouts_and_dtypes(kernel):
    ql = _qlinear(bits=4, group=64, gran="row", rank=8, smooth=True)
    il = IntLinear.from_quantlinear(ql, kernel)
    x = _x()
    with torch.no_grad():
        x2 = x.reshape(-1, 256)  # (M, C): "row" means per row = per token
        assert _rel(il(x2), ql(x2)) < 1e-4
        xt = _x((256, 120)).t()  # non-contiguous input
        assert _rel(il(xt), ql(xt)) < 1e-4
        assert _rel(il(x[0, 0]), ql(x[0, 0])) < 1e-4  # 1-D input
        assert il(x[:0]).shape == (0, 40, 192)
        for inp in (x, x[1:], xt, x.bfloat16()):  # the caller's input is never overwritten
            before = inp.clone()
            il(inp)
            IntLinear.from_quantlinear(_qlinear(bits=4, group=64))(inp)  # no smooth
            assert torch.equal(inp, before)
        yb = il(x.bfloat16())  # bf16 in -> bf16 out, computed from the same codes in float32
        ref = ql(x.bfloat16().float())
        assert yb.dtype == torch.bfloat16 and _rel(yb.float(), ref) < 1e-2


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kernel", KERNELS)
def test_extreme_zero_point_uses_exact_wide_path(kernel, bits):
    """x far from 0 relative to its range: zx is huge, the int32 bound fails: e's excess over the layer's bound
    (emax) enters as a float32 rank-1 term (the fused kernel's bound fails too and the layer takes the torch path
    for that input, rebuilding its operands from the packed nibbles for 4-bit weights)."""
    ql = _qlinear(bits=bits, group=64, gran="token", rank=4)
    il = IntLinear.from_quantlinear(ql, kernel)
    x = (50.0 if bits == 8 else 1000.0) + 1e-3 * torch.randn(2, 8, 256)  # 4-bit: smaller CB, larger zx
    _, _, _, zx = quantize_act_int8(x.reshape(-1, 256), ql.act_cfg)
    assert float((128 - zx).abs().max()) > il.emax and not ops_torch.int32_safe(
        ops_torch.int32_bound(il._eager_operands(), il.group), il.emax + 1)
    assert kernel == "torch" or not il._fused_safe(float(zx.abs().max()))
    with torch.no_grad():
        assert _rel(il(x), ql(x)) < 1e-4


def test_folded_row_scales_and_real_lora_fit():
    """A folded V-row scale (ditas) stays integer; a real LoRA fit from QuantLinear.from_float."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 96)
    x = _x((4, 5, 64))
    absmax = x.abs().amax((0, 1))
    ql = quantize_linear(lin, 0.5, absmax, WeightQuantConfig(bits=4, group_size=32),
                                ActQuantConfig(8, "row"), lora_rank=8, lora_iters=3)
    r = torch.rand(96) + 0.5
    ql.set_qweight(scale_qweight_rows(ql.qweight, r))
    with torch.no_grad():
        assert _rel(IntLinear.from_quantlinear(ql)(x), ql(x)) < 1e-4


@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_storage_state_dict_and_casts(kernel):
    ql = _qlinear(bits=4, group=128, rank=8, smooth=True)
    il = IntLinear.from_quantlinear(ql, kernel)
    sd = il.state_dict()
    assert "codes_packed" in sd and "codes" not in sd and sd["codes_packed"].shape == (192, 128)
    assert not any(key in sd for key in ("w_op", "cb_t", "d_t", "w_scale_t", "lora_Lt", "lora_rsum", "w_vnni",
                                         "f_sw", "f_cbd", "f_d", "f_Lt", "f_bias"))
    other = IntLinear.from_quantlinear(_qlinear(bits=4, group=128, rank=8, smooth=True, seed=5), kernel)
    other.load_state_dict(sd)
    x = _x()
    with torch.no_grad():
        assert torch.equal(other(x), il(x))
        il.bfloat16()  # dtype casts leave integer operands and float32 scales alone
        # (the fused kernel's operand of 4-bit weights: the raw codes two per byte, uint8)
        assert (il.w_vnni4 if il.fused else il.w_op).dtype == (torch.uint8 if il.fused else torch.int8)
        assert il.scale.dtype == torch.float32
        assert torch.equal(il(x), other(x))
    # a fused layer keeps the nibbles once (w_vnni4, no codes_packed), its state_dict the stored form
    assert (il.codes_packed is None) == il.fused and (other.codes_packed is None) == other.fused
    assert torch.equal(sd["codes_packed"], pack_int4(ql.codes)) and sd["codes_packed"].dtype == torch.uint8
    assert torch.equal(other.state_dict()["codes_packed"], sd["codes_packed"])
    assert list(other.state_dict()) == list(sd)
    assert "codes" in IntLinear.from_quantlinear(_qlinear(bits=8)).state_dict()


def _one_line_error(exc):
    msg = str(exc.value)
    assert "\n" not in msg and "use --backend fake" in msg, msg


def test_unsupported_layouts_raise_clear_error():
    w = torch.randn(64, 32)
    act = ActQuantConfig(8, "tensor", scheme="reference")
    ref = QuantLinear(quantize_weight(w, WeightQuantConfig(bits=4, scheme="reference")), act_cfg=act)
    with pytest.raises(ValueError) as exc:
        IntLinear.from_quantlinear(ref)
    _one_line_error(exc)
    assert "reference" in str(exc.value)
    no_act = QuantLinear(quantize_weight(w, WeightQuantConfig(bits=8, group_size=16)))
    with pytest.raises(ValueError) as exc:
        IntLinear.from_quantlinear(no_act)
    _one_line_error(exc)
    ql = _qlinear(bits=8, group=32)
    ql.fake_quant_only = True
    with pytest.raises(ValueError) as exc:
        IntLinear.from_quantlinear(ql)
    _one_line_error(exc)
    ql = _qlinear(bits=8, group=32)
    ql.weight[0, 0] += 1.0  # weight no longer what the codes say
    with pytest.raises(ValueError) as exc:
        IntLinear.from_quantlinear(ql)
    _one_line_error(exc)
    ql = _qlinear(bits=8, group=32)
    ql.zero[0, 0] += 0.5  # non-integer zero point
    with pytest.raises(ValueError) as exc:
        IntLinear(ql.codes, ql.scale, ql.zero, ql.weight_cfg, ql.act_cfg)
    _one_line_error(exc)


def test_functional_entry_points():
    x = _x()
    q8, q4 = _qlinear(bits=8, group=64, rank=4), _qlinear(bits=4, group=64, rank=4)
    with torch.no_grad():
        assert _rel(linear_w8a8(x, q8), q8(x)) < 1e-4
        assert _rel(linear_w4a8(x, IntLinear.from_quantlinear(q4)), q4(x)) < 1e-4
        with pytest.raises(ValueError, match="linear_w4a8"):
            linear_w8a8(x, q4)
        with pytest.raises(ValueError, match="linear_w8a8"):
            linear_w4a8(x, q8)


def test_to_int_backend_swaps_every_quantlinear():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = _qlinear(k=256, n=128, bits=4, group=64, rank=4, seed=1)
            self.act = nn.GELU()
            self.fc2 = _qlinear(k=128, n=256, bits=8, group=None, rank=4, smooth=True, seed=2)
            self.other = nn.Linear(256, 256)

        def forward(self, x):
            return self.other(self.fc2(self.act(self.fc1(x))))

    torch.manual_seed(0)  # nn.Linear's init draws from the global RNG: the model must not depend on test order
    model = nn.Sequential(Block(), Block())
    x = _x((2, 10, 256))
    with torch.no_grad():
        ref = model(x)
        assert to_int_backend(model) is model
        assert not any(isinstance(m, QuantLinear) for m in model.modules())
        assert sum(isinstance(m, IntLinear) for m in model.modules()) == 4
        assert _rel(model(x), ref) < 1e-4
    assert isinstance(to_int_backend(_qlinear()), IntLinear)
    # a weight-only layer (float activations, e.g. --quantize-adaln) stays QuantLinear, unchanged
    float_acts = QuantLinear(quantize_weight(torch.randn(16, 16), WeightQuantConfig(bits=8, group_size=None)))
    mixed = nn.Sequential(_qlinear(k=16, n=16), float_acts)
    xin = _x((3, 16))
    with torch.no_grad():
        before = mixed(xin)
        to_int_backend(mixed)
        assert isinstance(mixed[0], IntLinear) and mixed[1] is float_acts
        assert _rel(mixed(xin), before) < 1e-4


@pytest.mark.parametrize("bits,group", [(8, None), (8, 64), (4, 128)])
def test_row_tiles(monkeypatch, bits, group):
    """Several row tiles (last one partial) give the same result as one."""
    ql = _qlinear(bits=bits, group=group, gran="token", rank=4, smooth=True)
    il = IntLinear.from_quantlinear(ql, "torch")
    x = _x()  # 120 rows
    with torch.no_grad():
        whole = il(x)
        monkeypatch.setattr(ops_torch, "_TILE_BYTES", {True: 4 * 192 * 16, False: 4 * 192 * 16})
        monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
        assert ops_torch.tile_rows(120, 192, group is None) == 16
        assert _rel(il(x), whole) < 1e-6  # BLAS blocking may differ per tile size
        assert _rel(il(x), ql(x)) < 1e-4


@pytest.mark.parametrize("kernel", KERNELS)
def test_folded_dit_end_to_end(kernel):
    """A small DiT with ditas QuantLinears, smoothing folded, then swapped to the integer backend."""
    from models import DiT_models

    torch.manual_seed(0)
    model = DiT_models["DiT-XS/2"](input_size=8, in_channels=3, num_classes=10)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model = quantize_blocks(model, 4, 32, g)
    x, t, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g), torch.arange(4)
    with torch.no_grad():
        ref = model(x, t, y)
        to_int_backend(model, kernel)
        assert sum(isinstance(m, IntLinear) and m.fused == (kernel == "fused")
                   for m in model.modules()) == 4 * len(model.blocks)
        # the Mlp GELU moved into fc1's epilogue
        assert all(b.mlp.fc1.activation == "gelu_tanh" and isinstance(b.mlp.act, nn.Identity) for b in model.blocks)
        assert all(b.attn.qkv.activation is None and b.mlp.fc2.activation is None for b in model.blocks)
        out = model(x, t, y)
    # same codes layer by layer up to float-rounding ties: agreement far below the quantization error
    assert _rel(out, ref) < 1e-4, _rel(out, ref)


# ---------------------------------------------------------------------------
# the fused CPU kernel (quant/kernels/csrc/int_linear.c) against the torch._int_mm path
# ---------------------------------------------------------------------------

needs_fused = pytest.mark.skipif(ops_avx512.load() is None, reason=f"fused kernel: {ops_avx512.status()}")


@needs_fused
@pytest.mark.parametrize("k,n,bits,group,gran,rank", [
    (256, 40, 8, None, "row", 4),     # N not a multiple of 16 or 32: masked stores of the last block
    (128, 17, 4, 32, "token", 0),
    (96, 200, 4, 16, "tensor", 3),
    (512, 64, 8, 128, "row", 8)])
@pytest.mark.parametrize("rows", [1, 5, 97, 203])  # micro-tile (6) and chunk (96) remainders
def test_fused_kernel_matches_torch_kernel(k, n, bits, group, gran, rank, rows):
    ql = _qlinear(k=k, n=n, bits=bits, group=group, gran=gran, rank=rank, smooth=True)
    fused, eager = IntLinear.from_quantlinear(ql, "fused"), IntLinear.from_quantlinear(ql, "torch")
    x = _x((rows, k), kind="gelu" if rows % 2 else "outliers")
    with torch.no_grad():
        yf, ye = fused(x), eager(x)
        assert yf.shape == (rows, n) and torch.isfinite(yf).all()
        assert (yf - ye).abs().max() <= 1e-6 * ye.abs().max()  # same integers, float epilogue order only
        yb = fused(x.bfloat16())  # bf16 written by the kernel (round to nearest even)
        ref = eager(x.bfloat16().float())
        assert yb.dtype == torch.bfloat16
        assert ((yb.float() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-6 * ref.abs().max()).all()


@needs_fused
def test_fused_kernel_threads_agree():
    ql = _qlinear(k=256, n=96, bits=4, group=64, gran="row", rank=4)
    il = IntLinear.from_quantlinear(ql, "fused")
    x = _x((4, 50, 256))
    with torch.no_grad():
        one = il(x)
        torch.set_num_threads(2)
        try:
            two = il(x)
        finally:
            torch.set_num_threads(1)
    assert torch.equal(one, two)  # threads split whole (rows x 32 columns) units: same arithmetic


def test_pack_b4_is_pack_b_two_steps_per_byte():
    """pack_b4's low / high nibbles are pack_b's even / odd 4-K steps; unpack_b4 inverts it (N tail)."""
    g = torch.Generator().manual_seed(3)
    for n, k in ((40, 64), (32, 8), (1, 16), (97, 200)):
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        p4, p8 = ops_avx512.pack_b4(codes), ops_avx512.pack_b(codes.t().to(torch.int8))
        npad = -n // 32 * -32
        assert p4.dtype == torch.uint8 and p4.shape == (npad // 32, k // 8, 32, 4) and p4.numel() * 2 == npad * k
        assert torch.equal((p4 & 15).to(torch.int8), p8[:, 0::2]) and torch.equal((p4 >> 4).to(torch.int8), p8[:, 1::2])
        assert torch.equal(ops_avx512.unpack_b4(p4, n), codes)
    with pytest.raises(ValueError, match="multiple of 8"):
        ops_avx512.pack_b4(torch.zeros(32, 12, dtype=torch.uint8))


@needs_fused
@pytest.mark.parametrize("k,n,group", [(256, 40, 32), (384, 200, 128), (200, 17, None), (128, 64, 64), (64, 33, 8)])
@pytest.mark.parametrize("rows", [1, 5, 97, 203])
def test_fused_w4_kernel_integers_exact(k, n, group, rows):
    """ditas_qgemm_w4's integer part: with unit scales its output is sum_g D_g, exactly
    sum_k (a - zx)(w - zw) (every partial < 2^24: exact in float32)."""
    g = torch.Generator().manual_seed(k + n + rows)
    group = group or k
    ng = k // group
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    codes[0] = 15  # the extremes of the nibbles
    codes[-1, : k // 2] = 0
    zw = torch.randint(0, 16, (n, ng), generator=g)
    a = torch.randint(0, 256, (rows, k), dtype=torch.uint8, generator=g)
    a[0] = 255
    zx = torch.randint(-20, 276, (rows,), generator=g).to(torch.int32)
    npad = -n // 32 * -32
    cw = codes.view(n, ng, group).sum(-1, dtype=torch.int32)
    cbd = ops_avx512.pad_cols((cw - group * zw).t().to(torch.int32), npad)
    dq = ops_avx512.pad_cols((-zw).t().to(torch.int32), npad)
    sa = a.view(rows, ng, group).sum(-1, dtype=torch.int32)
    ones = torch.ones(ng, npad)
    out = torch.empty(rows, n)
    ops_avx512.qgemm(a, ops_avx512.pack_b4(codes), n, group, ones, cbd, dq, sa, zx, torch.ones(1), None, 0,
                     torch.zeros(0, npad), None, out)
    wz = codes.long() - zw.repeat_interleave(group, 1)
    ref = (a.long() - zx.long()[:, None]) @ wz.t()
    assert ref.abs().max() < 2 ** 24
    assert torch.equal(out.long(), ref) and torch.equal(out, ref.float())


@needs_fused
@pytest.mark.parametrize("k,n,bits,group,gran,rank", [
    (256, 40, 4, None, "row", 4),     # per channel; N not a multiple of 16 or 32
    (128, 17, 4, 32, "token", 0),
    (384, 96, 4, 64, "token", 8),
    (512, 72, 4, 128, "row", 0),
    (96, 200, 3, 16, "tensor", 3),    # 3-bit codes, packed the same way
    (64, 33, 4, 8, "token", 2)])
@pytest.mark.parametrize("rows", [1, 5, 97, 203])  # micro-tile (6) and chunk (96) remainders
@pytest.mark.parametrize("activation", [None, "gelu_tanh"])
def test_fused_w4_kernel_matches_torch_kernel(k, n, bits, group, gran, rank, rows, activation):
    """The packed 4-bit operand (raw codes, offset in the corrections) against the torch path's int8
    one: same integers, float epilogue order only; bf16 output rounded once; GELU epilogue."""
    ql = _qlinear(k=k, n=n, bits=bits, group=group, gran=gran, rank=rank, smooth=True, bias=rows % 2 == 1)
    fused = IntLinear.from_quantlinear(ql, "fused", activation)
    eager = IntLinear.from_quantlinear(ql, "torch", activation)
    assert fused.w_vnni4 is not None and fused.w_vnni is None and fused.codes_packed is None
    assert eager.w_vnni4 is None and eager.codes_packed is not None
    x = _x((rows, k), kind="gelu" if rows % 2 else "outliers")
    with torch.no_grad():
        yf, ye = fused(x), eager(x)
        assert yf.shape == (rows, n) and torch.isfinite(yf).all()
        assert (yf - ye).abs().max() <= 1e-6 * ye.abs().max()
        yb = fused(x.bfloat16())
        ref = eager(x.bfloat16().float())
        assert yb.dtype == torch.bfloat16
        assert ((yb.float() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-6 * ref.abs().max()).all()


@needs_fused
@pytest.mark.parametrize("group", [32, 128, None])
def test_fused_w4_kernel_threads_agree(group):
    ql = _qlinear(k=256, n=200, bits=4, group=group, gran="token", rank=4)
    il = IntLinear.from_quantlinear(ql, "fused")
    eager = IntLinear.from_quantlinear(ql, "torch")
    x = _x((4, 50, 256))
    with torch.no_grad():
        one = il(x)
        for threads in (2, 3):
            torch.set_num_threads(threads)
            try:
                assert torch.equal(il(x), one)
            finally:
                torch.set_num_threads(1)
        ye = eager(x)
    assert (one - ye).abs().max() <= 1e-6 * ye.abs().max()


def _held_bytes(module):
    return sum(b.numel() * b.element_size() for b in module.buffers())


@needs_fused
def test_fused_w4_layer_memory():
    """A fused 4-bit IntLinear keeps about half a byte per weight (the nibbles once, no int8 B, no
    unpacked codes): <= 0.6x the same layer at 8 bits, persistent and non-persistent buffers alike."""
    k, n = 768, 384
    held = {}
    for bits in (8, 4):
        il = IntLinear.from_quantlinear(_qlinear(k=k, n=n, bits=bits, group=128, rank=0), "fused")
        held[bits] = _held_bytes(il)
        if bits == 4:
            names = {name for name, b in il.named_buffers()}
            assert "w_vnni4" in names and not names & {"codes", "codes_packed", "w_vnni", "w_op"}
            assert il.w_vnni4.numel() == n * k // 2
            # the weights' share: half a byte per weight plus per-group scales, zero points and sums
            assert held[4] - 2 * 4 * n <= n * k * (0.5 + 5 * 4 / 128)  # less bias, f_bias
    assert held[4] <= 0.6 * held[8], held
    torch_layer = IntLinear.from_quantlinear(_qlinear(k=k, n=n, bits=4, group=128, rank=0), "torch")
    assert torch_layer.codes_packed is not None and torch_layer.w_op.dtype == torch.int8  # the fallback's form


def test_w4_fused_needs_groups_of_8():
    """pack_b4 holds 8 K values per 32-bit lane pair: a 4-bit group of 4 (mod 8) runs on torch._int_mm."""
    ql = _qlinear(k=96, n=40, bits=4, group=12, rank=2)
    if ops_avx512.load() is not None:
        with pytest.raises(ValueError, match="not multiples of 8"):
            IntLinear.from_quantlinear(ql, "fused")
    il = IntLinear.from_quantlinear(ql)
    assert not il.fused and il.w_op is not None
    x = _x((3, 96))
    with torch.no_grad():
        assert _rel(il(x), ql(x)) < 1e-4


def test_kernel_choice_errors():
    with pytest.raises(ValueError, match="kernel must be one of"):
        IntLinear.from_quantlinear(_qlinear(), "cuda")
    odd = _qlinear(k=254, n=32, bits=8, group=None)  # K not a multiple of 4: no vpdpbusd layout
    with pytest.raises(ValueError, match="fused integer kernel unavailable"):
        IntLinear.from_quantlinear(odd, "fused")
    auto = IntLinear.from_quantlinear(odd)  # auto falls back to torch._int_mm
    assert not auto.fused
    x = _x((3, 254))
    with torch.no_grad():
        assert _rel(auto(x), odd(x)) < 1e-4


def test_ckernel_build_cache_and_switch(tmp_path, monkeypatch):
    cc = ops_avx512._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("DITAS_CACHE", str(tmp_path))
    path = ops_avx512._build(cc)
    assert os.path.dirname(path) == str(tmp_path) and os.path.getsize(path) > 0
    stamp = os.stat(path).st_mtime_ns
    assert ops_avx512._build(cc) == path and os.stat(path).st_mtime_ns == stamp  # cached, not rebuilt
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary left behind
    monkeypatch.setenv("DITAS_CKERNEL", "0")
    assert ops_avx512._load.__wrapped__() == (None, "disabled by DITAS_CKERNEL=0")


@needs_fused
@pytest.mark.parametrize("k", [64, 200, 36])  # whole 16-lane vectors and masked tails
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gran", ["tensor", "row", "token"])
def test_fused_activation_codes_are_the_quantizers(k, dtype, gran):
    """rowrange + encode (C) give quant.method.quantizer.quantize_act's codes bit for bit, group sums and
    the LoRA down-projection (a - zero) R^T."""
    g = torch.Generator().manual_seed(k)
    x = (_x((3, 7, k), seed=k, kind="gelu" if k == 200 else "outliers")).to(dtype)
    smooth = torch.rand(k, generator=g) + 0.5
    cfg = ActQuantConfig(8, gran)
    codes, _, zero = quantize_act(x / smooth, cfg)
    x2 = ops_avx512.rows(x.reshape(-1, k))
    mn, mx = ops_avx512.rowrange(x2, smooth)
    xs = (x2.float() / smooth)
    assert torch.equal(mn, xs.amin(1)) and torch.equal(mx, xs.amax(1))
    mn, mx = ops_torch.combine_range(mn.view(-1, 1), mx.view(-1, 1), gran, ops_torch.batch_of(x.shape, gran))
    sx, zx = affine_params(mn, mx, 255)
    rt = ops_avx512.pad_cols(torch.randn(k, 5, generator=g), 16)
    a, sa, lp = ops_avx512.encode(x2, smooth, sx, zx, 255, group=4, rt=rt)
    assert a.dtype == torch.uint8 and torch.equal(a, codes.reshape(-1, k))
    assert torch.equal(sa.long(), a.long().view(21, k // 4, 4).sum(-1))
    ref = (a.double() - zx.double()) @ rt.double()
    assert (lp.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.equal(torch.broadcast_to(zx, (21, 1)).reshape(-1), torch.broadcast_to(zero, x.shape)[..., 0].reshape(-1))


@pytest.mark.parametrize("kernel", KERNELS)
def test_gelu_epilogue(kernel):
    """activation="gelu_tanh" == torch's GELU(tanh) of the plain layer's output, over a wide range of
    pre-activations (the fused kernel's exp saturates cleanly at both ends)."""
    ql = _qlinear(k=128, n=80, bits=4, group=32, gran="row", rank=4)
    with torch.no_grad():
        ql.bias.mul_(15.0)  # outputs from about -50 to 50
    plain = IntLinear.from_quantlinear(ql, kernel)
    act = IntLinear.from_quantlinear(ql, kernel, "gelu_tanh")
    with pytest.raises(ValueError, match="activation must be one of"):
        IntLinear.from_quantlinear(ql, kernel, "relu")
    x = _x((2, 30, 128))
    with torch.no_grad():
        pre = plain(x)
        ref = torch.nn.functional.gelu(pre, approximate="tanh")
        y = act(x)
        assert pre.min() < -30 and pre.max() > 30
        assert ((y - ref).abs() <= 2e-6 * ref.abs() + 1e-6).all(), float((y - ref).abs().max())
        yb = act(x.bfloat16())  # GELU in float32, one rounding to bf16
        ref = torch.nn.functional.gelu(plain(x.bfloat16().float()), approximate="tanh")
        assert yb.dtype == torch.bfloat16
        assert ((yb.float() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-5).all()


def _c_prototypes():
    """{name: [(param name, 'ptr' | C type)]} of every exported ditas_* function in quant/kernels/csrc/*.c."""
    import re
    found = {}
    for path in ops_avx512.SOURCES:
        src = open(path).read()
        for name, params in re.findall(r"^(?:void|int)\s+(ditas_\w+)\(([^)]*)\)\s*\{", src, re.M):
            out = []
            for p in (p.strip() for p in params.split(",") if p.strip() and p.strip() != "void"):
                ptr = "*" in p
                words = p.replace("*", " ").split()
                out.append((words[-1], "ptr" if ptr else " ".join(w for w in words[:-1] if w != "const")))
            found[name] = out
    return found


def test_ctypes_prototypes_match_the_c_sources():
    """ops_avx512.PROTOTYPES names every parameter of the C entry points, in order, with its ctypes type."""
    import ctypes
    c = _c_prototypes()
    assert set(ops_avx512.PROTOTYPES) <= set(c), set(ops_avx512.PROTOTYPES) - set(c)
    for name, params in ops_avx512.PROTOTYPES.items():
        assert [p for p, _ in params] == [p for p, _ in c[name]], name
        for (pname, ctype), (_, ckind) in zip(params, c[name]):
            want = ctypes.c_void_p if ckind == "ptr" else {"int64_t": ctypes.c_int64}[ckind]
            assert ctype is want, (name, pname, ckind)
    # every exported entry point with parameters is declared (the *_supported probes take none)
    assert {n for n, p in c.items() if p} == set(ops_avx512.PROTOTYPES)


def test_int32_emax_is_the_edge_of_the_int32_bound():
    """int32_emax(bound): the largest |128 - zx| whose int32 partials fit (int32_safe), for per-channel and grouped
    4- and 8-bit layers, and -1 / INT32_MAX at the extremes."""
    for bits, group, wshift in ((8, None, 0.0), (8, 32, 0.0), (4, 64, 5.0), (4, None, 0.0)):
        il = IntLinear.from_quantlinear(_qlinear(bits=bits, group=group, wshift=wshift), "torch")
        bound = ops_torch.int32_bound(il._eager_operands(), il.group)
        emax = ops_torch.int32_emax(bound)
        assert emax == il.emax and 0 < emax < ops_torch.INT32_MAX
        assert ops_torch.int32_safe(bound, emax) and not ops_torch.int32_safe(bound, emax + 1)
    assert ops_torch.int32_emax((ops_torch.INT32_MAX, 0.0, 0.0)) == -1
    assert ops_torch.int32_emax((1024, 0.0, 0.0)) == ops_torch.INT32_MAX
