"""The integer linear in torch ops: torch._int_mm per K-group, exact zero-point corrections, float epilogue.

The released DiTAS code only simulates low bits (fake quantization in float). IntLinear
(quant/nn/int_linear.py) computes a `ditas`-scheme layer with integer GEMMs; this module is its portable
kernel (any device with torch._int_mm: CUDA, CPUs without AVX512-VNNI; the fused CPU kernel,
quant/kernels/ops_avx512.py, and the Triton kernels compute the same integers):

    y = xq Q^T + (xq R^T) L^T + b,   xq = (ax - zx) sx,   Q[n, k] = (wq[n, k] - zw[n, g]) sw[n, g]

with activation codes ax in [0, 2^A - 1] (from the same quantizer as the fake path:
range, scale and zero point of `quant.method.quantizer`), weight codes wq with one (scale,
integer zero point) per group of G consecutive input columns of an output row (g = k // G;
per output channel: one group of G = K). The integer GEMM operands are

    A[m, k] = ax[m, k] - 128          int8 (the shift is folded into the quantizer's zero-point add)
    B[k, n] = wq[n, k] - c[n, g]      int8, c = zw clamped into [2^b - 128, 128]
                                      (= zw itself whenever that fits, e.g. 4-bit weights)

With e[m] = 128 - zx[m] and d[n, g] = c[n, g] - zw[n, g] (integers), the exact integer dot
product of group g is

    D_g = sum_{k in g} (ax - zx)(wq - zw) = A_g B_g + e CB_g + (SA_g + G e) d_g

with CB_g[n] = sum_{k in g} B[k, n] (precomputed) and SA_g[m] = sum_{k in g} A[m, k].
A_g B_g comes from one int8 GEMM (int32 accumulation); the two rank-1 corrections are
added in int32, exactly (no float cancellation when codes crowd far from 128). Where the activation zero
point is extreme, e beyond the layer's int32 bound is added in int64 by the Triton kernel and as a float32
rank-1 term here; neither reads e back to the host to decide. Then

    y = sx * ( sum_g sw_g D_g  +  (A R^T + e rowsum(R)) L^T ) + b

The LoRA term is the fake path's (xq R^T) L^T in float32 with sx factored out. Remaining
differences to the fake path are float32 rounding (~1e-7 relative).

Grouped weights need one int GEMM per K-group: the group scales differ per output column,
so the int32 partials must be scaled before they are summed. Rows are processed in tiles
so that each tile's int32 partials and float accumulator stay in cache; the epilogue
(correct, scale, add, LoRA, bias) is memory-bound otherwise.
"""
import functools

import torch
import torch.nn.functional as F

from quant.method.quantizer import affine_params, num_intervals

INT32_MAX = 2 ** 31 - 1
# float32 accumulator bytes per row tile and thread: per-channel weights (one GEMM per tile)
# prefer larger tiles, grouped ones (a GEMM + scale-accumulate per group) smaller, cache-resident ones
_TILE_BYTES = {True: 4 << 20, False: 2 << 20}


# ---------------------------------------------------------------------------
# int8 GEMM
# ---------------------------------------------------------------------------

def _int_mm_reference(a, b):
    """Exact fallback: products and sums of these integers are exact in float64 (|sum| < 2^53)."""
    return (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int32)


@functools.lru_cache(maxsize=None)
def _int_mm_ok(device_type):
    """Does torch._int_mm exist on this device and accumulate exactly (no int16 pair saturation)?"""
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        k = 64
        a = torch.full((32, k), -128, dtype=torch.int8, device=device_type)
        b = torch.full((k, 32), -128, dtype=torch.int8, device=device_type)
        b[1::2] = 127
        a[:, 1::3] = 127
        ok = torch.equal(torch._int_mm(a, b).cpu().long(), a.cpu().long() @ b.cpu().long())
    except (RuntimeError, NotImplementedError):
        return False
    return ok


def int8_matmul(a, b):
    """Exact int32 product of int8 matrices a (M, K) and b (K, N).

    torch._int_mm on CPU (torch 2.13, oneDNN) accepts any M, K, N >= 1 and
    non-contiguous operands (and a uint8 `a`, unused here); CUDA needs M > 16 and K, N
    multiples of 8 (padded here with zeros, which is exact). Falls back to an exact
    float64 product where _int_mm is missing or fails the exactness probe.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise ValueError(f"int8_matmul expects int8 operands, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"int8_matmul shapes do not fit: {tuple(a.shape)} x {tuple(b.shape)}")
    m, k = a.shape
    n = b.shape[1]
    if k * 128 * 128 > INT32_MAX:
        raise ValueError(f"K = {k} can overflow the int32 accumulator")
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(m, n, dtype=torch.int32, device=a.device)
    if not _int_mm_ok(a.device.type):
        return _int_mm_reference(a, b)
    if a.device.type == "cuda" and (m <= 16 or k % 8 or n % 8):
        pm, pk, pn = max(17 - m, 0), -k % 8, -n % 8
        out = torch._int_mm(F.pad(a, (0, pk, 0, pm)), F.pad(b, (0, pn, 0, pk)))
        return out[:m, :n]
    return torch._int_mm(a, b)


# ---------------------------------------------------------------------------
# Activation quantization (the quant.method.quantizer quantizer, with fewer passes)
# ---------------------------------------------------------------------------

def act_range(x2, granularity, batch):
    """(min, max) per row of x2 (M, C), shaped (M, 1) -- or (1, 1) when one range covers all.

    Separate amin/amax: torch.aminmax with a dim is ~20x slower on CPU (torch 2.13).
    """
    if granularity == "tensor" or (granularity == "row" and batch == 1):
        return x2.amin().view(1, 1), x2.amax().view(1, 1)
    return combine_range(x2.amin(1, keepdim=True), x2.amax(1, keepdim=True), granularity, batch)


def combine_range(mn, mx, granularity, batch):
    """Per-row (M, 1) min/max -> the granularity's ranges: (M, 1), or (1, 1) when one covers all."""
    m = mn.shape[0]
    if granularity == "token" or (granularity == "row" and batch == m):
        return mn, mx
    if granularity == "row" and batch > 1:
        per = m // batch
        return (mn.view(batch, per).amin(1, keepdim=True).repeat_interleave(per, 0),
                mx.view(batch, per).amax(1, keepdim=True).repeat_interleave(per, 0))
    return mn.amin().view(1, 1), mx.amax().view(1, 1)


def batch_of(shape, granularity):
    """Leading size whose entries get their own range under "row" (the fake path's x[b])."""
    return shape[0] if granularity == "row" and len(shape) >= 2 else 1


def quantize_act_int8(x2, cfg, batch=1, inplace=False):
    """Activation codes of x2 (M, C) float32, shifted to int8: the fake path's quantizer exactly.

    x2 may be bf16/fp16 (read upcast). Returns (a, t, scale, zero): a int8 (M, C) = codes - 128,
    t the same values as float32, scale/zero (M, 1) or (1, 1) with codes = clamp(round(x/scale) + zero, 0, 2^A-1)
    bit for bit as quant.method.quantizer.quantize_act. `batch`: number of leading x[b] blocks
    for granularity "row" (their rows are consecutive in x2). inplace: x2 is a private
    temporary and becomes t (saves a fresh (M, C) float buffer: page faults dominate
    elementwise passes over fresh memory).
    """
    mn, mx = act_range(x2, cfg.granularity, batch)  # exact in x2's dtype; the arithmetic is float32
    scale, zero = affine_params(mn.float(), mx.float(), num_intervals(cfg.bits, cfg.scheme))
    t = x2.div_(scale) if inplace else torch.div(x2, scale)
    t.round_()
    t.add_(zero - 128)
    t.clamp_(-128, 2 ** cfg.bits - 1 - 128)
    return t.to(torch.int8), t, scale, zero


OPERANDS = ("w_op", "cb_t", "d_t", "w_scale_t", "lora_Lt", "lora_rsum", "excess_v")


def offset_c(bits, zero):
    """c float32 (N, ng): the zero points clamped into [2^b - 128, 128], so that B = codes - c fits int8."""
    return zero.clamp(2 ** bits - 1 - 127, 128)


@torch.no_grad()
def offsets(codes, bits, zero):
    """(c, cb_t, d_t) of every integer kernel's exact zero-point algebra (the module docstring).

        codes   uint8 (N, K) codes in [0, 2^bits - 1]; zero float32 (N, ng) integer zero points, G = K / ng
    c float32 (N, ng): offset_c; cb_t int32 (ng, N): the column sums of B per group; d_t float32 (ng, N) = c - zero
    (exact integers; 0 when zero fits).
    """
    n, k = codes.shape
    ng = zero.shape[1]
    g = k // ng
    c = offset_c(bits, zero)
    cw = codes.view(n, ng, g).sum(-1, dtype=torch.int32)   # column sums of the codes: CB = CW - G c
    return c, (cw - g * c.to(torch.int32)).t().contiguous(), (c - zero).t().contiguous()


def b_operand(codes, c):
    """B = codes - c: int8 (N, K) from uint8 codes (N, K) and offsets c (N, ng) (offset_c)."""
    n, k = codes.shape
    ng = c.shape[1]
    return (codes.view(n, ng, k // ng).to(torch.int16) - c.to(torch.int16).unsqueeze(-1)).view(n, k).to(torch.int8)


def codes_of_b(b, c):
    """The uint8 codes (N, K) back from b_operand's B and the same c: B + c, exact."""
    n, k = b.shape
    ng = c.shape[1]
    return (b.view(n, ng, k // ng).to(torch.int16) + c.to(torch.int16).unsqueeze(-1)).view(n, k).to(torch.uint8)


def operands(codes, bits, scale, zero, lora_L, lora_R, weight=True):
    """The torch path's weight operands {name: tensor} from a layer's stored form.

        codes   uint8 (N, K) codes in [0, 2^bits - 1]
        scale   float32 (N, ng), zero float32 (N, ng) integer zero points; group G = K / ng
        lora_L  float32 (N, r), lora_R float32 (r, K)
    Returns w_op int8 (K, N) = B = codes - c (offsets(); None unless `weight`), cb_t int32 (ng, N), d_t
    float32 (ng, N) (offsets()), w_scale_t (ng, N), lora_Lt (r, N), lora_rsum (r,), excess_v float32 (N,) =
    sum_g sw_g (CB_g + G d_g) (what one unit of e beyond the int32 bound adds to sum_g sw_g D_g; see linear).
    """
    n, k = codes.shape
    ng = scale.shape[1]
    c, cb_t, d_t = offsets(codes, bits, zero)
    w_op = b_operand(codes, c).t().contiguous() if weight else None
    g = k // ng
    excess_v = (scale.t().double() * (cb_t.double() + g * d_t.double())).sum(0).float()
    return {"w_op": w_op, "cb_t": cb_t, "d_t": d_t,
            "w_scale_t": scale.t().contiguous(), "excess_v": excess_v,
            "lora_Lt": lora_L.t().contiguous(),
            "lora_rsum": lora_R.sum(1)}


def int32_bound(ops, group):
    """(g*128*128, max|CB|, g max|d|): |int32 partial| <= g*128*128 + |e| max|CB| + g max|d| (128 + |e|)."""
    cb, d = ops["cb_t"], ops["d_t"]
    return (group * 128 * 128, float(cb.abs().max()) if cb.numel() else 0.0,
            float(d.abs().max()) * group if d.numel() else 0.0)


def int32_safe(bound, emax):
    """Do the int32 partials of an input whose activation zero-point offset is at most emax fit int32?"""
    p, cbm, dg = bound
    return p + emax * cbm + dg * (128 + emax) < INT32_MAX


def int32_emax(bound):
    """The largest integer |e| = |128 - zx| for which int32_safe(bound, |e|) holds (-1 if none; at most
    INT32_MAX): known when the layer is prepared, so that kernels decide int32 or int64 without reading e."""
    p, cbm, dg = bound
    room = INT32_MAX - 1 - p - 128 * dg
    if room < 0:
        return -1
    return INT32_MAX if cbm + dg == 0 else int(min(room // (cbm + dg), INT32_MAX))


def tile_rows(m, n, per_channel):
    """Rows per tile: the float32 accumulator tile is _TILE_BYTES per thread (threads split rows)."""
    budget = _TILE_BYTES[per_channel] * max(1, torch.get_num_threads())
    return max(16, min(m, budget // (4 * max(n, 1))))


def linear(x2, ops, layer, batch, emax, use_sa):
    """torch._int_mm per K-group and row tile; float32 (M, N) out.

        x2       (M, K) float32/bf16/fp16   the layer's input rows (read, never written)
        ops      operands(): w_op int8 (K, N), cb_t int32 (ng, N), d_t float32 (ng, N),
                 w_scale_t float32 (ng, N), lora_Lt float32 (r, N), lora_rsum float32 (r,), excess_v float32 (N,)
        layer    what the input side needs: act_cfg, smooth (K,) or None, lora_R float32 (r, K),
                 bias (N,) or None, n_groups, group, out_features
        batch    leading x[b] blocks of x2 (row granularity's ranges)
        emax     int32_emax(int32_bound(ops, group));  use_sa: any d != 0 (both known when the layer is prepared)

    Per row tile and group g: P = A_g B_g (int32) + e CB_g + (SA_g + G e) d_g is the exact
    integer sum_{k in g} (ax - zx)(wq - zw) (corrected in the integer domain, so that no
    float cancellation occurs when codes crowd far from 128; e beyond the int32 bound adds
    its excess through excess_v in float32); o += sw_g P. Then
    o += (A R^T + e rowsum R) L^T, y = sx o + b.
    """
    m, n = x2.shape[0], layer.out_features
    out = torch.empty(m, n, dtype=torch.float32, device=x2.device)
    if not m:
        return out
    x = x2
    x2 = x.to(torch.float32).contiguous()  # (.to alone keeps a transposed layout)
    private = x2.data_ptr() != x.data_ptr()  # a copy we may overwrite
    if layer.smooth is not None:
        x2 = x2.div_(layer.smooth) if private else x2 / layer.smooth
        private = True
    a, t, sx, zx = quantize_act_int8(x2, layer.act_cfg, batch, private)
    ng, g = layer.n_groups, layer.group
    e = 128 - zx                                           # (M, 1) or (1, 1), integers
    # e1 = e clamped to the layer's int32 bound (int32_emax): the corrections in int32, exact; e2 = e - e1 is 0 but
    # where the zero point is extreme (x far from 0 relative to its range), and adds e2 excess_v in float32 (one
    # rank-1 update; same sign as e1's share, no cancellation). Nothing is read back to decide.
    e1 = e.clamp(-emax, emax)
    e2 = (e - e1).expand(m, 1)
    e_c = e1.to(torch.int32).expand(m, 1)
    cb = ops["cb_t"]
    if use_sa:
        d = ops["d_t"].to(torch.int32)
        # SA_g: exact in float32 (|sum| <= 128 g < 2^24); SA_g + g e1 fits int32 by the bound
        sae = (t.view(m, ng, g).sum(-1).to(torch.float64) + g * e1.to(torch.float64)).to(torch.int32)
    lora = layer.lora_R.shape[0] > 0
    if lora:
        lp = torch.addmm(e * ops["lora_rsum"], t, layer.lora_R.t())
    if ng > 1:
        a = a.view(m, ng, g).transpose(0, 1).contiguous()     # (ng, M, G): contiguous tiles per group
    w_op, sw, bias = ops["w_op"], ops["w_scale_t"], layer.bias
    sx = sx.expand(m, 1)
    step = m if x2.is_cuda else tile_rows(m, n, ng == 1)  # CPU: cache-sized row tiles; CUDA: one
    for m0 in range(0, m, step):
        rows = slice(m0, m0 + step)
        o = out[rows]
        if lora:
            torch.mm(lp[rows], ops["lora_Lt"], out=o)
        for j in range(ng):
            p = int8_matmul(a[rows] if ng == 1 else a[j, rows], w_op[j * g:(j + 1) * g])
            p.addcmul_(e_c[rows], cb[j])
            if use_sa:
                p.addcmul_(sae[rows, j:j + 1], d[j])
            if j == 0 and not lora:
                torch.mul(p, sw[0], out=o)
            else:
                o.addcmul_(p, sw[j])
        o.addcmul_(e2[rows], ops["excess_v"])
        if bias is None:
            o.mul_(sx[rows])
        else:
            torch.addcmul(bias, o, sx[rows], out=o)
    return out
