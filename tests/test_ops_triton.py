"""Triton integer kernels (quant/kernels/ops_triton.py) on CPU through Triton's interpreter, against the torch-op
integer path (IntLinear kernel="torch"), quant.method.quantizer's activation codes and the fake backend."""
import dataclasses
import importlib.util
import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU tensors

import pytest
import torch

pytest.importorskip("triton", reason="triton not installed: pip install triton (tests run its CPU interpreter)")

from helpers import int_input, int_layer  # noqa: E402
from quant.kernels import ops_triton as ot  # noqa: E402
from quant.nn.int_linear import IntLinear  # noqa: E402
from quant.kernels.ops_torch import batch_of as _batch_of, quantize_act_int8  # noqa: E402
from quant.method.quantizer import pack_int4, quantize_act  # noqa: E402
from quant.quant_config import ActQuantConfig

torch.set_num_threads(1)
pytestmark = pytest.mark.skipif(not ot.available(), reason=f"Triton kernels: {ot.status()}")


def _rel(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def _qlinear(k=128, n=40, **kwargs):
    return int_layer(k, n, **kwargs)


def _x(shape, seed=1, kind="outliers"):
    return int_input(shape, seed, kind)


def _codes(a):
    """The uint8 activation codes from quantize_act's int8 operand A = codes - 128."""
    return (a.to(torch.int16) + 128).to(torch.uint8)


def _run(ql, x, activation=None, out_dtype=None):
    """The Triton linear of a QuantLinear on x (..., K), shaped like x."""
    il = IntLinear.from_quantlinear(ql, "torch")
    ops = ot.prepare_layer(il)
    cfg = ql.act_cfg
    y = ot.linear(x.reshape(-1, ql.in_features), ops, cfg.granularity, cfg.bits, cfg.scheme,
                  _batch_of(x.shape, cfg.granularity), il.smooth, activation, out_dtype)
    return y.view(*x.shape[:-1], ql.out_features), il


# ---------------------------------------------------------------------------
# activation pass
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("gran", ["tensor", "row", "token"])
@pytest.mark.parametrize("dtype,k,group,kind", [(torch.float32, 96, 32, "outliers"), (torch.bfloat16, 72, None, "gelu"),
                                                (torch.float32, 40, 8, "gelu")])
def test_activation_codes_are_the_quantizers(gran, dtype, k, group, kind):
    """codes == quant.method.quantizer.quantize_act's bit for bit (with smooth, bf16 input, column tails), group sums
    exact, lp == (codes - zx) R^T."""
    g = torch.Generator().manual_seed(k)
    x = _x((3, 7, k), seed=k, kind=kind).to(dtype)
    smooth = torch.rand(k, generator=g) + 0.5
    cfg = ActQuantConfig(8, gran)
    codes_ref, _, zero = quantize_act(x.float() / smooth, cfg)
    x2 = x.reshape(-1, k)
    r = torch.randn(5, k, generator=g)
    a8, gsum, lp, sx, zx = ot.quantize_act(x2, 8, "ditas", gran, _batch_of(x.shape, gran), smooth, group, r)
    codes = _codes(a8)
    assert a8.dtype == torch.int8 and torch.equal(codes, codes_ref.reshape(-1, k))
    a, t, sx_t, zx_t = quantize_act_int8(x2.float() / smooth, cfg, _batch_of(x.shape, gran))
    assert torch.equal(codes.long(), a.long() + 128)
    assert torch.equal(sx, sx_t.expand(21, 1).reshape(-1)) and torch.equal(zx, zx_t.expand(21, 1).reshape(-1))
    assert torch.equal(zx, torch.broadcast_to(zero, x.shape)[..., 0].reshape(-1))
    gs = k if group is None else group
    assert gsum.dtype == torch.int32 and torch.equal(gsum.long(), codes.long().view(21, k // gs, gs).sum(-1))
    ref = (codes.double() - zx.double()[:, None]) @ r.double().t()
    assert lp.shape == (21, 16) and (lp[:, :5].double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.equal(lp[:, 5:], torch.zeros(21, 11))  # padded to 16 columns


def test_activation_codes_other_bits_schemes_and_strides():
    """A < 8, the reference scheme (2^A steps, top clipped), a transposed input, no smooth/LoRA."""
    xt = _x((64, 33)).t()  # (33, 64), non-contiguous
    for bits, scheme, gran in ((6, "ditas", "token"), (8, "reference", "tensor"), (7, "ditas", "row")):
        cfg = ActQuantConfig(bits, gran, scheme=scheme)
        a8, gsum, lp, sx, zx = ot.quantize_act(xt, bits, scheme, gran, _batch_of(xt.shape, gran))
        codes = _codes(a8)
        assert torch.equal(codes, quantize_act(xt, cfg)[0]) and lp is None
        assert torch.equal(gsum[:, 0].long(), codes.long().sum(1))
    assert ot.quantize_act(xt[:0])[0].shape == (0, 64)


def test_rounding_ties_go_to_even():
    """Range [0, 255] (scale 1, zero 0) and [-100, 155] (zero 100): x.5 values are exact ties of round()."""
    halves = torch.arange(-20, 20, dtype=torch.float32) * 6.5 + 0.5
    x2 = torch.stack([torch.cat([torch.tensor([0.0, 255.0]), halves.abs() % 255]),
                      torch.cat([torch.tensor([-100.0, 155.0]), halves.clamp(-100, 155)])])
    for gran in ("row", "token"):
        codes = _codes(ot.quantize_act(x2, 8, "ditas", gran, 2)[0])
        assert torch.equal(codes, quantize_act(x2, ActQuantConfig(8, gran))[0])
        assert torch.equal(codes[0, 2:].float(), torch.round(x2[0, 2:]))  # scale 1: codes are the rounded x
    assert (x2[0, 2:] % 2 == 0.5).any() and (x2[0, 2:] % 2 == 1.5).any()  # ties down and up


# ---------------------------------------------------------------------------
# GEMM: exact integers, then the layer against the torch-op path and the fake backend
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group,k,wshift", [(8, None, 96, 0), (8, 32, 128, 0), (4, 32, 128, 0), (3, 64, 128, 0),
                                                 (4, None, 96, 0), (4, 32, 128, 5.0)])
def test_integer_group_dots_exact(bits, group, k, wshift):
    """With sx = 1, one group's scale 1 and the others 0 (no LoRA, bias): out == D_g = sum (ax - zx)(wq - zw),
    in the int32 corrections and in the int64 ones (forced here by the operands' emax; the kernel takes them for
    row blocks whose |128 - zx| passes it)."""
    ql = _qlinear(k=k, n=40, bits=bits, group=group, bias=False, wshift=wshift)
    ops = ot.prepare_layer(IntLinear.from_quantlinear(ql, "torch"))
    assert (ops.d is not None) == (bits == 8 or wshift > 0)  # the S_g correction runs where d != 0
    x2 = _x((5, k), kind="gelu")
    a8, gsum, _, _, zx = ot.quantize_act(x2, group=ops.group)
    codes = _codes(a8)
    gs = ops.group
    wq = ql.codes.double().view(40, k // gs, gs) - ql.zero.double().unsqueeze(-1)
    aq = (codes.double() - zx.double()[:, None]).view(5, k // gs, gs)
    exact = torch.einsum("mgk,ngk->mgn", aq, wq)
    assert exact.abs().max() < 2 ** 24  # exactly representable in the float32 output
    for j in sorted({0, ops.n_groups - 1}):
        sw = torch.zeros_like(ops.scale)
        sw[:, j] = 1.0
        for emax in (ops.emax, -1):  # -1: every row block in int64
            one = dataclasses.replace(ops, scale=sw, emax=emax)
            out = ot.gemm(a8, gsum, None, torch.ones(5), zx, one)
            assert torch.equal(out.double(), exact[:, j]), (j, emax)
    assert (128 - zx).abs().max() <= ops.emax  # the default: int32


@pytest.mark.parametrize("bits,group,k,n", [(8, None, 96, 40), (8, 64, 128, 40), (4, 32, 128, 96), (4, 128, 256, 40),
                                            (4, None, 96, 40), (3, 32, 96, 40)])
@pytest.mark.parametrize("gran", ["tensor", "row", "token"])
def test_linear_matches_torch_path_and_fake(bits, group, k, n, gran):
    """W8A8 / W4A8 (and 3-bit packed) with LoRA, bias, smooth; M = 10 rows (tail of BLOCK_M), N = 40 (tail of
    BLOCK_N 32), per-channel K = 96 (tail of BLOCK_K 64); outliers and GELU-like inputs (zero point far from 128)."""
    ql = _qlinear(k=k, n=n, bits=bits, group=group, gran=gran, rank=4, smooth=True)
    for kind in ("outliers", "gelu"):
        x = _x((2, 5, k), kind=kind)
        y, il = _run(ql, x)
        with torch.no_grad():
            ref, fake = il(x), ql(x)
        assert y.shape == ref.shape and y.dtype == torch.float32
        assert _rel(y, ref) < 1e-5 and (y - ref).abs().max() <= 1e-4 * ref.abs().max(), (kind, _rel(y, ref))
        assert _rel(y, fake) < 1e-4, (kind, _rel(y, fake))


@pytest.mark.parametrize("bits,group,sym,rank,smooth,bias,wshift", [
    (8, 32, True, 0, False, False, 0), (2, 16, False, 3, True, False, 0), (6, 48, False, 0, True, True, 0),
    (4, 64, True, 17, False, True, 0), (4, 32, False, 4, True, True, 5.0)])
def test_other_widths_symmetric_and_options(bits, group, sym, rank, smooth, bias, wshift):
    """2/6-bit weights, symmetric, a group that is no power of two (48: masked BLOCK_K step), rank 17 (padded to
    32), with and without LoRA, smooth and bias, packed weights with d != 0; 2-D input under "row" (a range per row)."""
    ql = _qlinear(k=96 if group == 48 else 128, bits=bits, group=group, symmetric=sym, rank=rank, smooth=smooth,
                  bias=bias, gran="row", wshift=wshift)
    x = _x((5, ql.in_features))
    y, il = _run(ql, x)
    with torch.no_grad():
        assert _rel(y, il(x)) < 1e-5 and _rel(y, ql(x)) < 1e-4


def test_block_sizes_and_multi_step_groups():
    """BLOCK_K below the group (several int8 dots per group int32 accumulator) and other tiles agree."""
    ql = _qlinear(k=256, n=40, bits=4, group=128, rank=4, smooth=True)
    il = IntLinear.from_quantlinear(ql, "torch")
    ops = ot.prepare_layer(il)
    x2 = _x((9, 256))
    a8, gsum, lp, sx, zx = ot.quantize_act(x2, 8, "ditas", "token", 1, il.smooth, ops.group, ops.lora_R)
    base = ot.gemm(a8, gsum, lp, sx, zx, ops)
    for bm, bn, bk in ((16, 16, 32), (16, 64, 64), (64, 32, 128)):
        assert (ot.gemm(a8, gsum, lp, sx, zx, ops, launch=ot.Launch(bm, bn, bk)) - base).abs().max() \
            <= 1e-6 * base.abs().max()
    with torch.no_grad():
        assert _rel(base, il(x2)) < 1e-5


def test_extreme_zero_point_uses_int64_corrections():
    """x far from 0 relative to its range: the int32 bound fails, the kernel corrects in int64 (as the torch
    path switches to float64)."""
    ql = _qlinear(k=128, bits=8, group=64, gran="token", rank=4)
    x = 50.0 + 1e-3 * _x((2, 4, 128)) / 20
    ops = ot.prepare_layer(IntLinear.from_quantlinear(ql, "torch"))
    zx = ot.quantize_act(x.reshape(-1, 128), 8, "ditas", "token")[4]
    assert (128 - zx.double()).abs().max() > ops.emax
    y, il = _run(ql, x)
    with torch.no_grad():
        assert _rel(y, il(x)) < 1e-5 and _rel(y, ql(x)) < 1e-4


def test_gelu_epilogue_and_bf16():
    """GELU(tanh) in float32 over outputs from -50 to 50; bf16 in -> bf16 out (one rounding of the float32
    result); the IntLinear with the same fused activation agrees."""
    ql = _qlinear(k=128, n=40, bits=4, group=32, gran="row", rank=4)
    with torch.no_grad():
        ql.bias.mul_(25.0)
    x = _x((2, 6, 128))
    pre, il = _run(ql, x)
    y, _ = _run(ql, x, "gelu_tanh")
    ref = torch.nn.functional.gelu(pre, approximate="tanh")
    assert pre.min() < -30 and pre.max() > 30
    assert ((y - ref).abs() <= 2e-6 * ref.abs() + 1e-6).all(), float((y - ref).abs().max())
    with torch.no_grad():
        act = IntLinear.from_quantlinear(ql, "torch", "gelu_tanh")
        assert _rel(y, act(x)) < 1e-5
        yb, _ = _run(ql, x.bfloat16(), "gelu_tanh")
        refb = act(x.bfloat16().float())  # same codes: the input is read upcast
        assert yb.dtype == torch.bfloat16
        assert ((yb.float() - refb).abs() <= refb.abs() * 2 ** -8 + 1e-5 * refb.abs().max()).all()
        yf, _ = _run(ql, x.bfloat16(), "gelu_tanh", out_dtype=torch.float32)
        assert yf.dtype == torch.float32 and _rel(yf, refb) < 1e-5
        assert torch.equal(yb, yf.bfloat16())  # the kernel's bf16 store rounds to nearest even, as torch
        with pytest.raises(ValueError, match="out_dtype"):
            _run(ql, x, out_dtype=torch.float16)


# ---------------------------------------------------------------------------
# operands, errors, and the import without triton
# ---------------------------------------------------------------------------

def test_w4a8_operands_stay_packed():
    """A 1152x4608 W4A8 layer (G = 128) keeps 0.5 B per weight of codes, plus per-group operands."""
    n, k = 4608, 1152
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale, zero = torch.rand(n, k // 128) + 0.1, torch.randint(0, 16, (n, k // 128)).float()
    ops = ot.prepare(pack_int4(codes), 4, scale, zero, group=128)
    nb = ops.resident_bytes()
    assert ops.w.dtype == torch.uint8 and ops.w.shape == (n, k // 2) and nb["weights"] == n * k // 2
    assert ops.d is None  # 4-bit zero points fit the offset: no S_g correction
    assert (nb["weights"] + nb["groups"]) / (n * k) < 0.6, nb
    ops8 = ot.prepare(codes, 8, scale, zero, group=128)
    assert ops8.w.dtype == torch.int8 and ops8.w.shape == (n, k) and ops8.d is not None


def test_prepare_and_linear_errors():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    scale, zero = torch.ones(8, 2), torch.zeros(8, 2)
    with pytest.raises(ValueError, match="do not fit"):
        ot.prepare(codes, 8, scale, zero, group=16)
    with pytest.raises(ValueError, match="exceed"):
        ot.prepare(codes * 17, 6, scale, zero, group=32)
    with pytest.raises(ValueError, match="not integers"):
        ot.prepare(codes, 8, scale, zero + 0.5, group=32)
    ops = ot.prepare(codes, 8, scale, zero, group=32)
    with pytest.raises(ValueError, match="layer expects"):
        ot.linear(torch.randn(3, 63), ops)
    with pytest.raises(ValueError, match="activation must be"):
        ot.linear(torch.randn(3, 64), ops, activation="relu")
    assert ot.linear(torch.randn(0, 64), ops).shape == (0, 8)


def test_imports_without_triton(monkeypatch):
    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    spec = importlib.util.spec_from_file_location("ops_triton_without", ot.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert not mod.available() and "triton not importable" in mod.status()
    ops = mod.prepare(torch.randint(0, 256, (8, 32), dtype=torch.uint8), 8, torch.ones(8, 1), torch.zeros(8, 1))
    with pytest.raises(RuntimeError, match="Triton kernels unavailable"):
        mod.linear(torch.randn(2, 32), ops)


def test_kernels_compile_for_hopper_and_ampere(tmp_path):
    """The real compiler (not the interpreter) lowers every kernel variant the runtime launches for DiT-S/2 and
    DiT-XL/2 (256 and 512 px, batch 1 to 64 with CFG, every accepted group size, W8A8 and W4A8) for sm_90 and sm_80
    with the bundled ptxas, no GPU needed (tests/compile_kernels.py): wgmma int8 MMAs on sm_90 from 64-row tiles,
    mma.sync on sm_80, shared memory within each architecture's limit, IEEE divisions in the activation pass."""
    pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")
    from helpers import ROOT
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "compile_kernels.py"), "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0 and last.startswith("compiled "), (proc.stdout[-3000:], proc.stderr[-3000:])


def test_launch_table():
    """BLOCK_K >= 32 for every group (an int8 tl.dot needs K >= 32 on NVIDIA: groups 8, 12, 16 used to launch 16),
    covering groups up to 128 in one step; 64-row tiles and up from M = 64 (wgmma's warpgroup), 4 warps per 64 rows."""
    for g in (1, 8, 12, 16, 24, 32, 48, 64, 96, 128, 144, 1152, 4608):
        for m in (1, 16, 63, 64, 512, 1023, 1024, 131072):
            for arch in (80, 90):
                run = ot.gemm_launch(m, 1152, g, arch)
                assert 32 <= run.block_k <= 128 and (run.block_k >= g or run.block_k == 128), (g, m, run)
                assert run.block_m >= min(max(m, 16), 64) and run.block_m <= max(16, 2 * m)
                assert run.num_warps == max(4, run.block_m // 16) and run.num_stages >= 2
    assert ot.gemm_launch(16384, 1152, 128) == ot.Launch(128, 128, 128, 8, 3)


def test_group_of_8_runs_with_32_wide_k_steps():
    """Group 8 (accepted by QuantDiT.py: it divides DiT's widths) on the launch the runtime picks: masked 32-column
    steps, the same outputs as the torch-op path."""
    ql = _qlinear(k=64, n=40, bits=4, group=8, gran="token", rank=4, smooth=True)
    x = _x((3, 30, 64))
    assert ot.gemm_launch(90, 40, 8).block_k == 32
    y, il = _run(ql, x)
    with torch.no_grad():
        assert _rel(y, il(x)) < 1e-5


# ---------------------------------------------------------------------------
# IntLinear(kernel="triton"): selection and the layer's forward
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group,gran,rank", [(8, None, "row", 4), (4, 32, "token", 0), (4, 64, "tensor", 3)])
def test_intlinear_on_triton_matches_torch_kernel(bits, group, gran, rank):
    """An IntLinear on the Triton kernel: the same layer as on torch ops (and 4-bit codes stay packed)."""
    ql = _qlinear(k=128, n=40, bits=bits, group=group, gran=gran, rank=rank, smooth=True)
    x = _x((2, 5, 128))
    tri = IntLinear.from_quantlinear(ql, "triton")
    ref = IntLinear.from_quantlinear(ql, "torch")
    assert tri.runs == "triton" and ref.runs == "torch"
    with torch.no_grad():
        assert _rel(tri(x), ref(x)) < 1e-5
        assert _rel(tri(x.bfloat16()).float(), ref(x.bfloat16()).float()) < 1e-2
    if bits == 4:  # no unpacked copy: the Triton operand is the stored packed tensor itself
        assert tri.triton_ops.w.data_ptr() == tri.codes_packed.data_ptr() and tri.w_op is None


def test_auto_kernel_on_cpu_is_not_triton():
    """kernel "auto" picks Triton on CUDA only: CPU layers run the fused C kernel or torch ops."""
    il = IntLinear.from_quantlinear(_qlinear(), "auto")
    assert il.runs in ("fused", "torch")


def test_explicit_triton_kernel_that_cannot_run_names_the_alternative(monkeypatch):
    monkeypatch.setattr(ot, "available", lambda: False)
    monkeypatch.setattr(ot, "status", lambda: "triton not importable")
    with pytest.raises(ValueError, match=r"triton integer kernel unavailable: triton not importable; use kernel "
                                         r"'fused' \(x86 CPUs\) or 'torch'"):
        IntLinear.from_quantlinear(_qlinear(), "triton")


def test_w8a8_on_triton_keeps_one_copy_of_its_codes():
    """On Triton a W8A8 layer holds B = codes - c only (no uint8 codes beside it) and reads its scales and LoRA
    in place; its state_dict still has the codes, which load back into a layer that computes the same."""
    ql = _qlinear(k=128, n=40, bits=8, group=32, gran="row", rank=4, smooth=True)
    tri = IntLinear.from_quantlinear(ql, "triton")
    assert tri.runs == "triton" and tri.codes is None and tri.t_w.dtype == torch.int8
    ops = tri.triton_ops
    assert ops.scale.data_ptr() == tri.scale.data_ptr() and ops.lora_R.data_ptr() == tri.lora_R.data_ptr()
    state = tri.state_dict()
    assert torch.equal(state["codes"], ql.codes) and tri.codes is None
    fresh = IntLinear.from_quantlinear(_qlinear(k=128, n=40, bits=8, group=32, gran="row", rank=4, smooth=True,
                                                seed=5), "triton")
    fresh.load_state_dict(state)
    x = _x((2, 5, 128))
    with torch.no_grad():
        assert torch.equal(fresh(x), tri(x))
        assert torch.equal(fresh.t_w, tri.t_w) and fresh.codes is None
