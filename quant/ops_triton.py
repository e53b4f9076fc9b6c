"""Triton kernels for the integer backend: W8A8 / W4A8 linears with quant/ops_torch.py's exact integer algebra.

    _act_range_kernel   per-row min/max of x / smooth (then torch: granularity ranges, affine_params -> sx, zx)
    _act_encode_kernel  uint8 codes ax = quant.quantizer's bit for bit, per-K-group code sums S_g, lp = (ax - zx) R^T
    _int_gemm_kernel    per K-group int8 tl.dot of A = ax - 128, B = wq - c into int32, exact corrections
                        D_g = A_g B_g + e CB_g + (S_g - G zx) d_g (e = 128 - zx, d = c - zw), times sw_g in float32;
                        epilogue: * sx, + lp L^T, + bias, GELU(tanh), store fp32 or bf16 (round to nearest even)

W4A8 weights stay packed (pack_int4): the GEMM loads byte k // 2 for each k row of its (BLOCK_K, BLOCK_N) tile,
shifts by 4 (k % 2), masks 0xF and subtracts the group offset c in registers. No alignment is required (M, N and
K-group tails are masked; packed weights need an even K). Divisions are IEEE (tl.fdiv ieee_rounding), float32 dots
input_precision="ieee". CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before this module is imported.
"""
import os
from dataclasses import dataclass

import torch

from quant.ops_torch import INT32_MAX, combine_range, int32_bound, int32_safe, offsets
from quant.quantizer import affine_params, num_intervals, unpack_int4

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR = None
except Exception as err:  # not installed, or a broken install
    triton = tl = None
    _IMPORT_ERROR = f"triton not importable ({type(err).__name__}: {err}); pip install triton"

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read when the kernels are decorated (import time)
ACTIVATIONS = (None, "gelu_tanh")


def status():
    """Why the kernels can or cannot run here (one line)."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    where = ("interpreter (CPU tensors)" if INTERPRET else f"CUDA ({torch.cuda.get_device_name()})"
             if torch.cuda.is_available() else "no CUDA device, and TRITON_INTERPRET=1 was not set at import")
    return f"triton {triton.__version__}: {where}"


def available():
    return _IMPORT_ERROR is None and (INTERPRET or torch.cuda.is_available())



if triton is not None:
    @triton.jit
    def _load_x(x_ptr, s_ptr, rm, ks, mask, K, stride_m, stride_k, HAS_SMOOTH: tl.constexpr):
        """x[rm, ks] upcast to float32, divided by smooth[ks] (IEEE division, as torch's)."""
        x = tl.load(x_ptr + rm[:, None] * stride_m + ks[None, :] * stride_k, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            s = tl.load(s_ptr + ks, mask=ks < K, other=1.0)
            x = tl.fdiv(x, s[None, :], ieee_rounding=True)
        return x

    @triton.jit
    def _round_half_even(v):
        """torch.round on float32: |v| = f + fr with f = floor|v| and fr exact; ties go to the even f."""
        f = tl.floor(tl.abs(v))
        fr = tl.abs(v) - f
        r = tl.where((fr > 0.5) | ((fr == 0.5) & (f - 2.0 * tl.floor(f * 0.5) == 1.0)), f + 1.0, f)
        return tl.where(v < 0, -r, r)

    @triton.jit
    def _bf16_rtne(v):
        """float32 -> bfloat16 rounded to nearest even, as torch (the interpreter's cast truncates)."""
        u = v.to(tl.uint32, bitcast=True)
        u = tl.where(v != v, 0x7FC0, (u + 0x7FFF + ((u >> 16) & 1)) >> 16)
        return u.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _act_range_kernel(x_ptr, s_ptr, mn_ptr, mx_ptr, M, K, stride_m, stride_k,
                          HAS_SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        rm, rk = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_K)
        lo, hi = tl.zeros((BLOCK_M,), tl.float32) + float("inf"), tl.zeros((BLOCK_M,), tl.float32) - float("inf")
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + rk
            mask = (rm[:, None] < M) & (ks[None, :] < K)
            x = _load_x(x_ptr, s_ptr, rm, ks, mask, K, stride_m, stride_k, HAS_SMOOTH)
            lo = tl.minimum(lo, tl.min(tl.where(mask, x, float("inf")), 1))
            hi = tl.maximum(hi, tl.max(tl.where(mask, x, -float("inf")), 1))
        tl.store(mn_ptr + rm, lo, mask=rm < M)
        tl.store(mx_ptr + rm, hi, mask=rm < M)

    @triton.jit
    def _act_encode_kernel(x_ptr, s_ptr, sx_ptr, zx_ptr, a_ptr, gsum_ptr, rt_ptr, lp_ptr,
                           M, K, G, NG, stride_m, stride_k, LEVELS,
                           HAS_SMOOTH: tl.constexpr, HAS_LORA: tl.constexpr, RANK_P: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        rm, rk = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_K)
        mm = rm < M
        sx, zx = tl.load(sx_ptr + rm, mask=mm, other=1.0), tl.load(zx_ptr + rm, mask=mm, other=0.0)
        rr, lp = tl.arange(0, RANK_P), tl.zeros((BLOCK_M, RANK_P), tl.float32)
        for g in range(0, NG):
            s = tl.zeros((BLOCK_M,), tl.int32)
            for k0 in range(0, G, BLOCK_K):
                kk, ks = k0 + rk, g * G + k0 + rk
                mask = mm[:, None] & (kk[None, :] < G)
                x = _load_x(x_ptr, s_ptr, rm, ks, mask, K, stride_m, stride_k, HAS_SMOOTH)
                q = _round_half_even(tl.fdiv(x, sx[:, None], ieee_rounding=True)) + zx[:, None]
                q = tl.where(mask, tl.minimum(tl.maximum(q, 0.0), LEVELS), 0.0)
                tl.store(a_ptr + rm[:, None] * K + ks[None, :], q.to(tl.uint8), mask=mask)
                s += tl.sum(q.to(tl.int32), 1)
                if HAS_LORA:  # (ax - zx) is an exact integer in float32
                    r = tl.load(rt_ptr + ks[:, None] * RANK_P + rr[None, :], mask=(kk < G)[:, None], other=0.0)
                    lp = tl.dot(tl.where(mask, q - zx[:, None], 0.0), r, lp, input_precision="ieee")
            tl.store(gsum_ptr + rm * NG + g, s, mask=mm)
        if HAS_LORA:
            tl.store(lp_ptr + rm[:, None] * RANK_P + rr[None, :], lp, mask=mm[:, None])

    @triton.jit
    def _int_gemm_kernel(a_ptr, w_ptr, c_ptr, cb_ptr, d_ptr, sw_ptr, gsum_ptr, e_ptr, sx_ptr,
                         lp_ptr, lt_ptr, bias_ptr, out_ptr, M, N, K, G, NG,
                         PACKED: tl.constexpr, USE_SA: tl.constexpr, WIDE: tl.constexpr, HAS_LORA: tl.constexpr,
                         RANK_P: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, OUT_BF16: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mm, mn = rm < M, rn < N
        e = tl.load(e_ptr + rm, mask=mm, other=0).to(tl.int64 if WIDE else tl.int32)  # 128 - zx
        out = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for g in range(0, NG):
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
            if PACKED:
                c = tl.load(c_ptr + g * N + rn, mask=mn, other=0).to(tl.int32)
            for k0 in range(0, G, BLOCK_K):
                ks, mk = g * G + k0 + rk, k0 + rk < G
                a = tl.load(a_ptr + rm[:, None] * K + ks[None, :], mask=mm[:, None] & mk[None, :], other=128)
                a = (a.to(tl.int32) - 128).to(tl.int8)              # A = code - 128
                wmask = mk[:, None] & mn[None, :]
                if PACKED:                                           # byte k // 2, nibble k % 2
                    p = tl.load(w_ptr + rn[None, :] * (K // 2) + (ks // 2)[:, None], mask=wmask, other=0)
                    nib = (p.to(tl.int32) >> ((ks % 2) * 4)[:, None]) & 0xF
                    b = tl.where(wmask, nib - c[None, :], 0).to(tl.int8)
                else:
                    b = tl.load(w_ptr + rn[None, :] * K + ks[:, None], mask=wmask, other=0)
                acc = tl.dot(a, b, acc)
            cb = tl.load(cb_ptr + g * N + rn, mask=mn, other=0)
            if WIDE:  # extreme activation zero points: the same integer algebra in int64
                acc, cb = acc.to(tl.int64), cb.to(tl.int64)
            acc += e[:, None] * cb[None, :]
            if USE_SA:                                               # (S_g - G zx) d_g
                sae = tl.load(gsum_ptr + rm * NG + g, mask=mm, other=0) + G * (e - 128)
                d = tl.load(d_ptr + g * N + rn, mask=mn, other=0)
                acc += sae[:, None] * d[None, :]
            out += acc.to(tl.float32) * tl.load(sw_ptr + g * N + rn, mask=mn, other=0.0)[None, :]
        if HAS_LORA:
            rr = tl.arange(0, RANK_P)
            lp = tl.load(lp_ptr + rm[:, None] * RANK_P + rr[None, :], mask=mm[:, None], other=0.0)
            lt = tl.load(lt_ptr + rr[:, None] * N + rn[None, :], mask=mn[None, :], other=0.0)
            out = tl.dot(lp, lt, out, input_precision="ieee")
        out = out * tl.load(sx_ptr + rm, mask=mm, other=0.0)[:, None]
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=mn, other=0.0)[None, :]
        if GELU:  # 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)): no cancellation at either end
            u = 0.7978845608028654 * (out + 0.044715 * out * out * out)
            out = out / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))
        if OUT_BF16:
            out = _bf16_rtne(out)
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], out, mask=mm[:, None] & mn[None, :])


def _need():
    if not available():
        raise RuntimeError(f"Triton kernels unavailable: {status()}")


def _pow2(n, lo=16):
    return max(lo, 1 << (int(n) - 1).bit_length())


@dataclass
class Operands:
    """A layer's prepared weight side (N out, K in, G columns per group, NG = K / G, RP = rank padded to 2^i >= 16):
    w: int8 (N, K) = codes - c (bits 5..8) | uint8 (N, K/2) packed (bits <= 4);  c: int16 (NG, N) offsets (packed
    only);  cb: int32 (NG, N) column sums of B per group;  d: int32 (NG, N) = c - zw (None if all 0);  sw: float32
    (NG, N);  rt: float32 (K, RP) = R^T, lt: (RP, N) = L^T (None without LoRA);  bias: float32 (N,);  bound: int32 check
    """
    bits: int
    k: int
    group: int
    w: torch.Tensor
    c: torch.Tensor | None
    cb: torch.Tensor
    d: torch.Tensor | None
    sw: torch.Tensor
    rt: torch.Tensor | None
    lt: torch.Tensor | None
    bias: torch.Tensor | None
    bound: tuple

    n = property(lambda self: self.sw.shape[1])
    n_groups = property(lambda self: self.k // self.group)
    packed = property(lambda self: self.bits <= 4)

    def resident_bytes(self):
        """Bytes the GEMM keeps: {"weights", "groups", "lora", "bias"}."""
        nb = lambda *ts: sum(t.numel() * t.element_size() for t in ts if t is not None)  # noqa: E731
        return {"weights": nb(self.w), "groups": nb(self.c, self.cb, self.d, self.sw),
                "lora": nb(self.rt, self.lt), "bias": nb(self.bias)}


@torch.no_grad()
def prepare(codes_or_packed, bits, scale, zero, lora_L=None, lora_R=None, bias=None, group=None):
    """Weight operands for `gemm` / `linear` (ditas weight scheme):
    codes_or_packed: uint8 (N, K) codes (bits 5..8) | for bits <= 4 uint8 (N, K/2) of pack_int4, kept packed
    scale, zero:     float (N, NG) group scales and integer zero points
    lora_L, lora_R:  float (N, r), (r, K) or None;   bias: float (N,) or None
    group:           G input columns per group (None: per output channel, G = K)
    """
    w = codes_or_packed
    if w.dtype != torch.uint8 or w.dim() != 2 or not 2 <= bits <= 8:
        raise ValueError(f"expected {bits}-bit uint8 (N, K) codes or (N, K/2) packed ones, got {w.dtype} "
                         f"{tuple(w.shape)} (bits must be in 2..8)")
    codes = unpack_int4(w) if bits <= 4 else w  # a temporary, for the checks and column sums
    n, k = codes.shape
    g = k if group is None else int(group)
    if g < 1 or k % g or scale.shape != (n, k // g) or zero.shape != scale.shape or g * 128 * 128 > INT32_MAX:
        raise ValueError(f"scale/zero {tuple(scale.shape)} do not fit a {n}x{k} weight with group {group} "
                         "(G * 128^2 must fit int32)")
    levels = 2 ** bits - 1
    if codes.numel() and int(codes.max()) > levels:
        raise ValueError(f"weight codes exceed {levels} for {bits} bits")
    zero = zero.detach().float()
    if not bool(torch.isfinite(zero).all()) or not torch.equal(zero, zero.round()):
        raise ValueError("weight zero points are not integers")
    c, cb, d = offsets(codes, bits, zero)  # B = codes - c fits int8; CB its group sums; d = c - zero
    d = d.to(torch.int32)
    rank, rt, lt = 0 if lora_R is None else lora_R.shape[0], None, None
    if rank:
        if lora_L.shape != (n, rank) or lora_R.shape != (rank, k):
            raise ValueError(f"LoRA shapes {tuple(lora_L.shape)} x {tuple(lora_R.shape)} do not fit {n}x{k}")
        rt = torch.zeros(k, _pow2(rank), dtype=torch.float32, device=w.device)
        lt = torch.zeros(_pow2(rank), n, dtype=torch.float32, device=w.device)
        rt[:, :rank], lt[:rank] = lora_R.detach().float().t(), lora_L.detach().float().t()
    use_sa = bool((d != 0).any())
    bound = int32_bound({"cb_t": cb, "d_t": d}, g)
    if bits > 4:  # B itself, int8 (N, K); packed weights are unpacked and offset in the kernel
        w = (codes.view(n, k // g, g).to(torch.int16) - c.to(torch.int16).unsqueeze(-1)).view(n, k).to(torch.int8)
    return Operands(bits, k, g, w.contiguous(),
                    c.t().to(torch.int16).contiguous() if bits <= 4 else None, cb, d if use_sa else None,
                    scale.detach().float().t().contiguous(), rt, lt,
                    None if bias is None else bias.detach().float().contiguous(), bound)


def prepare_layer(layer):
    """Operands of a quant.int_linear.IntLinear (its stored codes, scales, LoRA and bias)."""
    rank = layer.lora_R.shape[0]
    return prepare(layer.codes_packed if layer.packed else layer.codes, layer.weight_cfg.bits, layer.scale,
                   layer.zero, layer.lora_L if rank else None, layer.lora_R if rank else None, layer.bias, layer.group)


def quantize_act(x2, bits=8, scheme="ditas", granularity="tensor", batch=1, smooth=None, group=None, rt=None,
                 block_m=16, block_k=64):
    """The activation pass: quant.quantizer's codes of x2 / smooth, group code sums, LoRA down-projection:
    x2:      float32 | bfloat16 | float16 (M, K), any strides, read upcast to float32
    smooth:  float32 (K,) divisor or None;  granularity, batch: as quant.ops_torch.quantize_act_int8
    group:   G of the code sums (None: G = K);  rt: float32 (K, RP) zero-padded R^T (Operands.rt) or None
    ->       codes uint8 (M, K), gsum int32 (M, K/G) code sums per group, lp float32 (M, RP) = (codes - zx) R^T
             or None, sx / zx float32 (M,) scale / integer zero point
    """
    _need()
    (m, k), dev = x2.shape, x2.device
    g = k if group is None else group
    if g < 1 or k % g:
        raise ValueError(f"group {group} does not divide K = {k}")
    rank_p = 0 if rt is None else rt.shape[1]
    codes = torch.empty(m, k, dtype=torch.uint8, device=dev)
    gsum = torch.empty(m, k // g, dtype=torch.int32, device=dev)
    lp = torch.empty(m, rank_p, dtype=torch.float32, device=dev) if rank_p else None
    if not m:
        return codes, gsum, lp, torch.ones(0, device=dev), torch.zeros(0, device=dev)
    s = None if smooth is None else smooth.float().contiguous()
    mn, mx = torch.empty(m, dtype=torch.float32, device=dev), torch.empty(m, dtype=torch.float32, device=dev)
    _act_range_kernel[(triton.cdiv(m, block_m),)](x2, mn if s is None else s, mn, mx, m, k, x2.stride(0),
                                                  x2.stride(1), HAS_SMOOTH=s is not None, BLOCK_M=block_m,
                                                  BLOCK_K=min(128, _pow2(k)))
    mn, mx = combine_range(mn.view(-1, 1), mx.view(-1, 1), granularity, batch)
    sx, zx = (t.expand(m, 1).reshape(m).contiguous() for t in affine_params(mn, mx, num_intervals(bits, scheme)))
    _act_encode_kernel[(triton.cdiv(m, block_m),)](
        x2, sx if s is None else s, sx, zx, codes, gsum, rt if rank_p else sx, lp if rank_p else sx, m, k, g, k // g,
        x2.stride(0), x2.stride(1), float(2 ** bits - 1), HAS_SMOOTH=s is not None, HAS_LORA=rank_p > 0,
        RANK_P=rank_p or 16, BLOCK_M=block_m, BLOCK_K=min(block_k, _pow2(g)))
    return codes, gsum, lp, sx, zx


def needs_int64(ops, e):
    """Can the int32 partials overflow for e = 128 - zx (int64 (M,))? (quant.ops_torch.int32_safe)"""
    return not int32_safe(ops.bound, float(e.abs().max()) if e.numel() else 0.0)


def gemm(codes, gsum, lp, sx, zx, ops, activation=None, out_dtype=torch.float32, block_m=32, block_n=32,
         block_k=64):
    """y = sx (sum_g sw_g D_g + lp L^T) + bias, optionally GELU(tanh): the integer GEMM and its epilogue:
    codes: uint8 (M, K); gsum: int32 (M, NG); lp: float32 (M, RP) | None; sx, zx: float32 (M,) (quantize_act's)
    ->     (M, N) out_dtype, torch.float32 or torch.bfloat16
    """
    _need()
    if activation not in ACTIVATIONS or out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"activation must be one of {ACTIVATIONS} (got {activation!r}) and out_dtype torch.float32 "
                         f"or torch.bfloat16 (got {out_dtype})")
    m, k = codes.shape
    if k != ops.k:
        raise ValueError(f"activation codes have {k} columns, the weight {ops.k}")
    out = torch.empty(m, ops.n, dtype=out_dtype, device=codes.device)
    if not m or not ops.n:
        return out
    e = (128 - zx.double()).to(torch.int64)
    rank_p = 0 if ops.rt is None else ops.rt.shape[1]
    dummy = ops.sw  # for pointers a kernel variant never reads
    _int_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(ops.n, block_n))](
        codes, ops.w, dummy if ops.c is None else ops.c, ops.cb, dummy if ops.d is None else ops.d, ops.sw, gsum,
        e, sx, lp if rank_p else dummy, ops.lt if rank_p else dummy, dummy if ops.bias is None else ops.bias, out,
        m, ops.n, k, ops.group, ops.n_groups, PACKED=ops.packed, USE_SA=ops.d is not None,
        WIDE=needs_int64(ops, e), HAS_LORA=rank_p > 0, RANK_P=rank_p or 16, HAS_BIAS=ops.bias is not None,
        GELU=activation == "gelu_tanh", OUT_BF16=out_dtype == torch.bfloat16, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=min(block_k, _pow2(ops.group)))
    return out


def linear(x2, ops, act_granularity="tensor", act_bits=8, act_scheme="ditas", batch=1, smooth=None,
           activation=None, out_dtype=None):
    """Integer W8A8 / W4A8 linear: quantize_act + gemm (quant.int_linear.IntLinear's forward, on Triton):
    x2:        float32 | bfloat16 | float16 (M, K);  ops: Operands (prepare / prepare_layer)
    batch:     leading x[b] blocks of act_granularity "row" (quant.ops_torch.batch_of of the original shape)
    smooth:    float32 (K,) or None;  activation: None | "gelu_tanh";  out_dtype: None = bf16 for bf16 input, else fp32
    ->         (M, N) out_dtype
    """
    if x2.dim() != 2 or x2.shape[1] != ops.k:
        raise ValueError(f"input of shape {tuple(x2.shape)}, layer expects (M, {ops.k})")
    if out_dtype is None:
        out_dtype = torch.bfloat16 if x2.dtype == torch.bfloat16 else torch.float32
    codes, gsum, lp, sx, zx = quantize_act(x2, act_bits, act_scheme, act_granularity, batch, smooth, ops.group, ops.rt)
    return gemm(codes, gsum, lp, sx, zx, ops, activation, out_dtype)
