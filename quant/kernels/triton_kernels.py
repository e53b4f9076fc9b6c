"""The Triton kernels of the integer backend (@triton.jit); their launchers, the launch table and the operands are in
quant/kernels/ops_triton.py, which imports this module only where triton imports (INTERPRET there).

    act_range_kernel    per-row min/max of x / smooth (then torch: granularity ranges, affine_params -> sx, zx)
    act_encode_kernel   uint8 codes ax = quant.method.quantizer's bit for bit, per-K-group code sums S_g,
                        lp = (ax - zx) R^T
    int_gemm_kernel     per K-group int8 tl.dot of A = ax - 128, B = wq - c into int32, exact corrections
                        D_g = A_g B_g + e CB_g + (S_g - G zx) d_g (e = 128 - zx, d = c - zw), times sw_g in float32;
                        epilogue: * sx, + lp L^T, + bias, GELU(tanh), store fp32 or bf16 (round to nearest even)

W4A8 weights stay packed (pack_int4): the GEMM loads byte k // 2 for each k row of its (BLOCK_K, BLOCK_N) tile,
shifts by 4 (k % 2), masks 0xF and subtracts the group offset c in registers. No alignment is required (M, N and
K-group tails are masked; packed weights need an even K). Divisions are IEEE (tl.fdiv ieee_rounding), float32 dots
input_precision="ieee". TRITON_INTERPRET=1 (CPU tensors) is read by triton.jit when this module is imported.
"""
import triton
import triton.language as tl


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
def act_range_kernel(x_ptr, s_ptr, mn_ptr, mx_ptr, M, K, stride_m, stride_k,
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
def act_encode_kernel(x_ptr, s_ptr, sx_ptr, zx_ptr, a_ptr, gsum_ptr, r_ptr, lp_ptr,
                       M, K, G, NG, RANK, stride_m, stride_k, LEVELS,
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
            tl.store(a_ptr + rm[:, None] * K + ks[None, :], (q - 128.0).to(tl.int8), mask=mask)
            s += tl.sum(q.to(tl.int32), 1)
            if HAS_LORA:  # R^T[ks, rr] read from R (RANK, K); (ax - zx) is an exact integer in float32
                r = tl.load(r_ptr + rr[None, :] * K + ks[:, None], mask=(kk < G)[:, None] & (rr < RANK)[None, :],
                            other=0.0)
                lp = tl.dot(tl.where(mask, q - zx[:, None], 0.0), r, lp, input_precision="ieee")
        tl.store(gsum_ptr + rm * NG + g, s, mask=mm)
    if HAS_LORA:
        tl.store(lp_ptr + rm[:, None] * RANK_P + rr[None, :], lp, mask=mm[:, None])

@triton.jit
def _group_dot(acc, a_ptr, w_ptr, c, rm, rn, mm, mn, k0, g, K, G, PACKED: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + A[rm, gG + k0 + (0..BLOCK_K)] B[same, rn]: one int8 x int8 -> int32 tensor-core step of group g."""
    rk = tl.arange(0, BLOCK_K)
    ks = g * G + k0 + rk
    mk = k0 + rk < G  # the group's tail (constant over 16 columns where 16 | G: loads stay vectorized)
    amask, wmask = mm[:, None] & mk[None, :], mk[:, None] & mn[None, :]
    a = tl.load(a_ptr + rm[:, None] * K + ks[None, :], mask=amask, other=0)  # A = code - 128, int8
    if PACKED:  # byte k // 2, nibble k % 2, minus the group offset c
        p = tl.load(w_ptr + rn[None, :] * (K // 2) + (ks // 2)[:, None], mask=wmask, other=0)
        nib = (p.to(tl.int32) >> ((ks % 2) * 4)[:, None]) & 0xF
        b = tl.where(wmask, nib - c[None, :], 0).to(tl.int8)
    else:
        b = tl.load(w_ptr + rn[None, :] * K + ks[:, None], mask=wmask, other=0)
    return tl.dot(a, b, acc)

@triton.jit
def _gemm_tile(pid_m, pid_n, a_ptr, w_ptr, c_ptr, cb_ptr, d_ptr, sw_ptr, gsum_ptr, e_ptr, sx_ptr, lp_ptr, l_ptr,
               bias_ptr, out_ptr, M, N, K, G, NG, RANK, ONE_STEP: tl.constexpr, WIDE: tl.constexpr,
               PACKED: tl.constexpr,
               USE_SA: tl.constexpr, HAS_LORA: tl.constexpr, RANK_P: tl.constexpr, HAS_BIAS: tl.constexpr,
               GELU: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) output tile: per K-group int8 dots, exact corrections in int32 (int64 if WIDE),
    times the group scale; then LoRA, sx, bias, GELU, store."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm, mn = rm < M, rn < N
    e = tl.load(e_ptr + rm, mask=mm, other=0)  # int64 128 - zx
    if not WIDE:
        e = e.to(tl.int32)
    out = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for g in range(0, NG):
        if PACKED:
            c = tl.load(c_ptr + g * N + rn, mask=mn, other=0).to(tl.int32)
        else:
            c = tl.zeros((BLOCK_N,), tl.int32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
        if ONE_STEP:  # G <= BLOCK_K: the group loop is the innermost one, the one the compiler pipelines
            acc = _group_dot(acc, a_ptr, w_ptr, c, rm, rn, mm, mn, 0, g, K, G, PACKED, BLOCK_K)
        else:
            for k0 in range(0, G, BLOCK_K):
                acc = _group_dot(acc, a_ptr, w_ptr, c, rm, rn, mm, mn, k0, g, K, G, PACKED, BLOCK_K)
        cb = tl.load(cb_ptr + g * N + rn, mask=mn, other=0)
        if WIDE:  # extreme activation zero points: the same integer algebra in int64
            p = acc.to(tl.int64) + e[:, None] * cb.to(tl.int64)[None, :]
        else:
            p = acc + e[:, None] * cb[None, :]
        if USE_SA:  # (S_g - G zx) d_g
            gs = tl.load(gsum_ptr + rm * NG + g, mask=mm, other=0).to(e.dtype)
            d = tl.load(d_ptr + g * N + rn, mask=mn, other=0).to(e.dtype)
            p += (gs + G * (e - 128))[:, None] * d[None, :]
        out += p.to(tl.float32) * tl.load(sw_ptr + rn * NG + g, mask=mn, other=0.0)[None, :]  # scale (N, NG)
    if HAS_LORA:  # + lp L^T, L^T[rr, rn] read from L (N, RANK)
        rr = tl.arange(0, RANK_P)
        lp = tl.load(lp_ptr + rm[:, None] * RANK_P + rr[None, :], mask=mm[:, None], other=0.0)
        lt = tl.load(l_ptr + rn[None, :] * RANK + rr[:, None], mask=(rr < RANK)[:, None] & mn[None, :], other=0.0)
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

@triton.jit
def _wide_block(e_ptr, pid_m, M, EMAX, BLOCK_M: tl.constexpr):
    """Does a row of this block have |128 - zx| > EMAX (int32 partials could overflow)?"""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return tl.max(tl.abs(tl.load(e_ptr + rm, mask=rm < M, other=0)), 0) > EMAX

@triton.jit
def int_gemm_kernel(a_ptr, w_ptr, c_ptr, cb_ptr, d_ptr, sw_ptr, gsum_ptr, e_ptr, sx_ptr, lp_ptr, l_ptr,
                     bias_ptr, out_ptr, M, N, K, G, NG, RANK, EMAX, ONE_STEP: tl.constexpr, WIDE: tl.constexpr,
                     PACKED: tl.constexpr, USE_SA: tl.constexpr, HAS_LORA: tl.constexpr, RANK_P: tl.constexpr,
                     HAS_BIAS: tl.constexpr, GELU: tl.constexpr, OUT_BF16: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """WIDE False: grid (row blocks, column tiles), int32 corrections, skips the row blocks that need int64.
    WIDE True: grid (row blocks,), returns at once unless its row block needs int64, then does its every
    column tile (extreme zero points are rare: no second full-size grid, and no int64 registers above)."""
    pid_m = tl.program_id(0)
    if _wide_block(e_ptr, pid_m, M, EMAX, BLOCK_M) != WIDE:
        return
    if WIDE:
        for pid_n in range(0, tl.cdiv(N, BLOCK_N)):
            _gemm_tile(pid_m, pid_n, a_ptr, w_ptr, c_ptr, cb_ptr, d_ptr, sw_ptr, gsum_ptr, e_ptr, sx_ptr, lp_ptr,
                       l_ptr, bias_ptr, out_ptr, M, N, K, G, NG, RANK, ONE_STEP, True, PACKED, USE_SA,
                       HAS_LORA, RANK_P,
                       HAS_BIAS, GELU, OUT_BF16, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _gemm_tile(pid_m, tl.program_id(1), a_ptr, w_ptr, c_ptr, cb_ptr, d_ptr, sw_ptr, gsum_ptr, e_ptr, sx_ptr,
                   lp_ptr, l_ptr, bias_ptr, out_ptr, M, N, K, G, NG, RANK, ONE_STEP, False, PACKED, USE_SA,
                   HAS_LORA, RANK_P,
                   HAS_BIAS, GELU, OUT_BF16, BLOCK_M, BLOCK_N, BLOCK_K)
