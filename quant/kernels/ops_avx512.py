"""ctypes wrappers of the DiTAS CPU kernels for x86 with AVX512 (quant/kernels/csrc/), compiled on first use.

Three kernels, one library: the fused integer linear (csrc/int_linear.c, AVX512-VNNI) that IntLinear
runs on CPUs (quant/nn/int_linear.py) and the alpha search's loss engine runs for the ditas scheme's
candidates (quant/search/losses.py); the reference scheme's bf16 alpha-search losses
(csrc/alpha_search_bf16.c, AVX512-BF16); and the LoRA loop's quantize-and-residual step
(csrc/weight_quant.c: one pass instead of a dozen torch ops, quant/method/lora.py).

torch._int_mm is fast, but around it the eager integer backend spends as much again on
memory passes over the (M, N) int32 partials: one GEMM and two rank-1 corrections per K-group,
scaling, LoRA, bias and a dtype conversion. int_linear.c does all of that in registers: per
32-column block of 6 rows it accumulates each K-group with vpdpbusd (u8 x s8 -> int32, exact),
applies the zero-point corrections in int32, scales into float accumulators, adds the LoRA
up-projection and bias and writes float32 or bf16 once.

Weight operand, per K-group g of G columns (A the activation codes, zx their zero point, W the
weight codes, zw their zero point): with any integer offset c, B = W - c, d = c - zw,
SA_g = sum_{k in g} A and CBD_g = sum_{k in g} (W - zw) (independent of c),

    D_g = sum_{k in g} (A - zx)(W - zw) = A_g B_g + SA_g d - zx CBD_g        (int32, exact)

* 8-bit weights (ditas_qgemm, `pack_b`): c = zw clamped into [2^b - 128, 128] so that B fits int8,
  one byte per weight; d = 0 (no SA needed) whenever zw itself fits.
* weights of <= 4 bits (ditas_qgemm_w4, `pack_b4`): c = 0, B = W the raw codes 0..15 (W - zw spans
  -15..15, no signed nibble), two per byte; d = -zw and CBD_g = CW_g - G zw with CW_g the group's
  column sums of W. The kernel splits each byte into its nibbles in registers (mask, shift): half
  the weight memory of the int8 layout and nothing else kept (the layer's codes_packed is rebuilt
  from it when needed, see quant/nn/int_linear.py).

The library is built and loaded by quant/kernels/avx512_build.py (`load()`, `status()`, re-exported here); where it
does not run, the torch ops run instead (quant/kernels/ops_torch.py, the same results).
"""
import functools

import torch
import torch.nn.functional as F

# the library (quant/kernels/avx512_build.py builds and loads it; re-exported: callers and tests reach it here)
from quant.kernels.avx512_build import (NB, PROTOTYPES, QR, SOURCES, _build, _compiler, _load, load,  # noqa: F401
                                        status)
from quant.kernels.ops_torch import INT32_MAX, combine_range
from quant.method.quantizer import affine_params, num_intervals

ALIGN_K = 4      # vpdpbusd consumes 4 consecutive K values per int32 lane
ALIGN_K4 = 8     # pack_b4: one byte holds two of them (K and the group a multiple of 8)


def _pack_blocks(t, lanes):
    """(K, N) -> [N/32 blocks][K/lanes][32 columns][lanes]: consecutive K values of a column share one
    32-bit lane (zero padding: K to a multiple of lanes, N to a multiple of 32)."""
    k, n = t.shape
    kpad, npad = -k // lanes * -lanes, -n // NB * -NB
    t = F.pad(t, (0, npad - n, 0, kpad - k))
    return t.view(kpad // lanes, lanes, npad // NB, NB).permute(2, 0, 3, 1).contiguous()


def pack_b(b):
    """(K, N) int8 -> the vpdpbusd layout Bp[j][k/4][c][k%4] = B[k, 32 j + c], N zero-padded to a multiple of 32."""
    return _pack_blocks(b, ALIGN_K)


def pack_b4(codes):
    """(N, K) uint8 codes in [0, 15], K a multiple of 8 -> the nibble layout of ditas_qgemm_w4, uint8
    (Npad/32, K/8, 32, 4): Bp4[j][k/8][c][t] = W[8(k/8) + t, 32 j + c] | W[8(k/8) + 4 + t, 32 j + c] << 4
    (W = codes^T), i.e. the low / high nibbles of step k/8 are pack_b's steps 2(k/8) / 2(k/8) + 1."""
    n, k = codes.shape
    if k % ALIGN_K4:
        raise ValueError(f"pack_b4 needs K a multiple of {ALIGN_K4}, got {k}")
    p = _pack_blocks(codes.t(), ALIGN_K)                   # (Npad/32, K/4, 32, 4), one code per byte
    p = p.view(p.shape[0], k // ALIGN_K4, 2, NB, ALIGN_K)
    return p[:, :, 0] | (p[:, :, 1] << 4)


def unpack_b4(bp4, n):
    """Inverse of pack_b4: the (N, K) uint8 codes (N the unpadded out_features)."""
    blocks, steps = bp4.shape[:2]
    p = torch.stack((bp4 & 15, bp4 >> 4), dim=2)           # (Npad/32, K/8, 2, 32, 4)
    w = p.permute(1, 2, 4, 0, 3).reshape(steps * ALIGN_K4, blocks * NB)   # (K, Npad)
    return w[:, :n].t().contiguous()


def pad_cols(t, npad):
    """Zero-pad the last dimension of t to npad (contiguous)."""
    return F.pad(t, (0, npad - t.shape[-1])).contiguous()


def _ptr(t):
    return None if t is None else t.data_ptr()


def rows(x2):
    """Row-major (M, K) float32/bf16 view of x2 for rowrange/encode (a copy only where needed)."""
    if x2.dtype not in (torch.float32, torch.bfloat16):
        x2 = x2.float()
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rowrange(x2, smooth):
    """(min, max) over each row of x2 / smooth, exactly torch's values (csrc/int_linear.c: ditas_rowrange):

        x2      float32 | bfloat16 (M, K) with unit column stride (rows());  smooth float32 (K,) contiguous or None
    ->  mn, mx  float32 (M,) each
    """
    m, k = x2.shape
    mn, mx = torch.empty(m), torch.empty(m)
    load().ditas_rowrange(m, k, x2.data_ptr(), x2.stride(0), int(x2.dtype == torch.bfloat16), _ptr(smooth),
                          mn.data_ptr(), mx.data_ptr(), torch.get_num_threads())
    return mn, mx


def encode(x2, smooth, scale, zero, levels, group=None, rt=None):
    """Activation codes of x2 / smooth, as quant.method.quantizer.quantize_act bit for bit (ditas_encode):

        x2      float32 | bfloat16 (M, K) with unit column stride (rows());  smooth float32 (K,) contiguous or None
        scale   float32, M or 1 elements;  zero float32 (integers), M or 1 elements;  levels: 2^bits - 1
        group   G columns per code sum, or None (no sums);  rt float32 (K, rpad), rpad % 16 == 0, or None
    ->  a uint8 (M, K) codes;  sa int32 (M, K/G) row sums per group or None;  lp float32 (M, rpad) = (a - zero) @ rt
        or None
    """
    m, k = x2.shape
    nt = torch.get_num_threads()
    a = torch.empty(m, k, dtype=torch.uint8)
    sa = None if group is None else torch.empty(m, k // group, dtype=torch.int32)
    lp = scratch = None
    if rt is not None:
        lp = torch.empty(m, rt.shape[1])
        scratch = torch.empty(nt * QR * k)
    scale, zero = scale.reshape(-1).contiguous(), zero.reshape(-1).contiguous()
    load().ditas_encode(m, k, x2.data_ptr(), x2.stride(0), int(x2.dtype == torch.bfloat16), _ptr(smooth),
                        scale.data_ptr(), int(scale.numel() > 1), zero.data_ptr(), int(zero.numel() > 1), levels,
                        a.data_ptr(), group or k, _ptr(sa), _ptr(rt), 0 if rt is None else rt.shape[1], _ptr(lp),
                        _ptr(scratch), nt)
    return a, sa, lp


def qgemm(a, bp, n, group, sw, cbd, dq, sa, zx, sx, lp, r, lt, bias, out, gelu=False):
    """out <- the fused linear (csrc/int_linear.c: ditas_qgemm, ditas_qgemm_w4); every operand prepared by the caller:

        a       uint8 (M, K) activation codes, unit column stride;  n: N output columns;  group: G = K / ng
        bp      int8 pack_b (ditas_qgemm) | uint8 pack_b4 (ditas_qgemm_w4), (Npad/32, ...)
        sw      float32 (ng, Npad);  cbd int32 (ng, Npad);  dq int32 (ng, Npad) or None where d = 0
        sa      int32 (M, ng) or None (None with dq);  zx int32, sx float32: M or 1 elements
        lp      float32 (M, >= r) or None;  r: the LoRA rank;  lt float32 (r, Npad);  bias float32 (Npad,) or None
        out     float32 | bfloat16 (M, N), unit column stride;  gelu: apply GELU (tanh form) to the result
    ->  out
    """
    m, k = a.shape
    npad = bp.shape[0] * NB
    r = 0 if lp is None else r
    entry = load().ditas_qgemm_w4 if bp.dtype == torch.uint8 else load().ditas_qgemm
    entry(m, n, npad, k, group, a.data_ptr(), a.stride(0), bp.data_ptr(), sw.data_ptr(), cbd.data_ptr(), _ptr(dq),
          _ptr(sa), zx.data_ptr(), int(zx.numel() > 1), sx.data_ptr(), int(sx.numel() > 1), _ptr(lp),
          0 if lp is None else lp.stride(0), r, _ptr(lt) if r else None, _ptr(bias), out.data_ptr(), out.stride(0),
          int(out.dtype == torch.bfloat16), int(gelu), torch.get_num_threads())
    return out


def _column_operands(npad, scale, cbd_t, d_t, lora_L, lora_R, bias):
    """Both kernels' per-column operands, zero-padded to whole 32-column blocks (npad columns):

        scale   float32 (N, ng);  cbd_t int32 (ng, N) = CBD;  d_t integer (ng, N) = d
        lora_L  float32 (N, r), lora_R float32 (r, K) (r may be 0);  bias float32 (N,) or None
    -> {f_sw float32 / f_cbd int32 / f_d int32 (ng, Npad), f_Lt (r, Npad), f_Rt (K, rpad), f_bias (Npad)}, f_d absent
    where d = 0 and f_bias without a bias.
    """
    rank = lora_R.shape[0]
    out = {"f_sw": pad_cols(scale.t(), npad), "f_cbd": pad_cols(cbd_t, npad), "f_Lt": pad_cols(lora_L.t(), npad),
           "f_Rt": pad_cols(lora_R.t(), -rank // 16 * -16)}
    if bool((d_t != 0).any()):
        out["f_d"] = pad_cols(d_t.to(torch.int32), npad)
    if bias is not None:
        out["f_bias"] = pad_cols(bias.float(), npad)
    return out


def w4_operands(codes, scale, zero, lora_L, lora_R, bias=None):
    """ditas_qgemm_w4's weight side of a grouped <= 4-bit weight, from its stored form.

        codes   uint8 (N, K) in [0, 15], K and the group G = K / ng multiples of ALIGN_K4
        scale   float32 (N, ng); zero float32 (N, ng) integer zero points zw
        lora_L  float32 (N, r), lora_R float32 (r, K) (r may be 0); bias float32 (N,) or None
    Returns ({w_vnni4 (pack_b4 of the raw codes), and _column_operands'}, int32 bound
    (g 255 max(codes) + 255 g max|zw|, max|CBD|)) with c = 0: d = -zw, CBD_g = sum_{k in g} (codes - zw).
    """
    n, k = codes.shape
    ng = scale.shape[1]
    g = k // ng
    zw = zero.to(torch.int32)
    cbd = codes.view(n, ng, g).sum(-1, dtype=torch.int32) - g * zw
    out = {"w_vnni4": pack_b4(codes),
           **_column_operands(-n // NB * -NB, scale, cbd.t(), (-zw).t(), lora_L, lora_R, bias)}
    bmax = int(codes.max()) if codes.numel() else 0
    zmax = float(zw.abs().max()) if zw.numel() else 0.0
    return out, (g * 255 * bmax + 255 * g * zmax, float(cbd.abs().max()) if cbd.numel() else 0.0)


def w8_operands(b, cb_t, d_t, scale, lora_L, lora_R, bias=None):
    """ditas_qgemm's weight side of a weight of 5..8 bits, from the torch path's operands (quant/kernels/ops_torch.py:
    operands, offsets):

        b       int8 (K, N) = B = codes - c (w_op);  cb_t int32 (ng, N) = CB_g, B's column sums per group
        d_t     float32 (ng, N) = c - zw (exact integers);  scale float32 (N, ng); G = K / ng
        lora_L  float32 (N, r), lora_R float32 (r, K) (r may be 0); bias float32 (N,) or None
    Returns ({w_vnni (pack_b of B), and _column_operands'}, int32 bound (g 255 128 + 255 g max|d|, max|CBD|)) with
    CBD_g = sum_{k in g} (codes - zw) = CB_g + G d_g.
    """
    g = b.shape[0] // cb_t.shape[0]
    cbd = cb_t + g * d_t.to(torch.int32)
    out = {"w_vnni": pack_b(b), **_column_operands(-b.shape[1] // NB * -NB, scale, cbd, d_t, lora_L, lora_R, bias)}
    dmax = float(d_t.abs().max()) if d_t.numel() else 0.0
    return out, (g * 255 * 128 + 255 * g * dmax, float(cbd.abs().max()) if cbd.numel() else 0.0)


def fused_safe(bound, zx_max):
    """Do the int32 partials fit for activation zero points up to zx_max in magnitude (bound: w4/w8_operands')?"""
    return bound[0] + zx_max * bound[1] < INT32_MAX


def fused_linear(x2, ops, layer, batch, bound):
    """An IntLinear's forward in two C passes (csrc/int_linear.c): ditas_rowrange and ditas_encode (codes, group sums,
    LoRA down-projection) over x, then ditas_qgemm / ditas_qgemm_w4 (u8 codes x packed weights with corrections,
    scales, LoRA and bias in registers).

        x2      (M, K) float32/bf16/fp16 input rows;  batch: leading x[b] blocks (row granularity)
        ops     w8_operands' or w4_operands' {name: tensor}: w_vnni int8 or w_vnni4 uint8 (the other None or absent),
                f_sw float32 / f_cbd int32 (ng, Npad), f_d int32 (ng, Npad) or None where d = 0, f_Rt (K, rpad),
                f_Lt (r, Npad), f_bias (Npad) or None
        layer   the declared side: act_cfg, smooth float32 (K,) or None, group, lora_R (r, K), out_features, activation
        bound   the int32 bound of w8_operands / w4_operands
    Returns (M, N) bf16 for bf16 input, else float32; None where this input's activation zero points
    break the kernel's int32 bound (the caller falls back to the torch ops).
    """
    cfg = layer.act_cfg
    x2 = rows(x2)
    mn, mx = rowrange(x2, layer.smooth)
    mn, mx = combine_range(mn.view(-1, 1), mx.view(-1, 1), cfg.granularity, batch)
    sx, zx = affine_params(mn, mx, num_intervals(cfg.bits, cfg.scheme))
    if not fused_safe(bound, float(zx.abs().max())):
        return None
    rank = layer.lora_R.shape[0]
    d = ops.get("f_d")
    a, sa, lp = encode(x2, layer.smooth, sx, zx, 2 ** cfg.bits - 1, None if d is None else layer.group,
                       ops["f_Rt"] if rank else None)
    out = torch.empty(x2.shape[0], layer.out_features,
                      dtype=torch.bfloat16 if x2.dtype == torch.bfloat16 else torch.float32)
    bp = ops["w_vnni"] if ops.get("w_vnni4") is None else ops["w_vnni4"]
    return qgemm(a, bp, layer.out_features, layer.group, ops["f_sw"], ops["f_cbd"], d, sa,
                 zx.to(torch.int32).reshape(-1), sx.reshape(-1).contiguous(), lp, rank, ops["f_Lt"],
                 ops.get("f_bias"), out, gelu=layer.activation == "gelu_tanh")


def quant_residual(w, lr, group, levels):
    """One round-to-nearest step of the LoRA loop in one pass (csrc/weight_quant.c).

        w       float32 (rows, K) contiguous, the weight;  lr float32 like w (L @ R) or None
        group   G columns per group (K % G == 0, G % 16 == 0);  levels 2^bits - 1
    Returns codes uint8 (rows, K), scale and zero float32 (rows, K / G) of v = w - lr (quant.method.quantizer's
    asymmetric ditas quantizer, bit for bit), and E = w - dequant(codes) float32 (rows, K).
    """
    rows, k = w.shape
    codes = torch.empty(rows, k, dtype=torch.uint8)
    scale, zero = torch.empty(rows, k // group), torch.empty(rows, k // group)
    e = torch.empty_like(w)
    load().ditas_quant_residual(rows, k, group, w.data_ptr(), _ptr(lr), levels, codes.data_ptr(), scale.data_ptr(),
                                zero.data_ptr(), e.data_ptr(), torch.get_num_threads())
    return codes, scale, zero, e


@functools.lru_cache(maxsize=None)
def bf16_ok():
    """Can ref_losses run here (the kernel library and AVX512-BF16)?"""
    lib = load()
    return lib is not None and bool(lib.ditas_bf16_supported())


def pack_bf16(m):
    """(C, W) float -> bfloat16 pairs for vdpbf16ps: Mp[j][c/2][i][c%2] = M[c, 32 j + i] (C, W zero-padded)."""
    return _pack_blocks(m.to(torch.bfloat16), 2)


def ref_losses(x, r0, rows, w, mp, partner, split, s, ranges):
    """Per-candidate sum over the rows of x (n, C) (rows r0.. of a step with `rows` rows) of
    ||bf16(E_k) M (+ P)||^2 (+ 2 <E_k, partner> when split): LossEngine._reference_losses for
    matmul_dtype bf16 (csrc/alpha_search_bf16.c), E_k = min(round((x / s_k) / scale), top) scale s_k - x with the
    quantizer's codes. s (k, C); ranges (scale, top), each (k, rows). Returns float64 (k,)."""
    n, c = x.shape
    k = s.shape[0]
    nt = torch.get_num_threads()
    e = torch.empty(k * n * (c + c % 2), dtype=torch.bfloat16)
    part = torch.zeros(nt, k, dtype=torch.float64)
    sc, top = (t.contiguous() for t in ranges)
    load().ditas_ref_losses(n, rows, r0, c, w, k, x.data_ptr(), s.data_ptr(), sc.data_ptr(), top.data_ptr(),
                            mp.data_ptr(), partner.data_ptr(), partner.stride(0), int(split), e.data_ptr(),
                            part.data_ptr(), nt)
    return part.sum(0)
