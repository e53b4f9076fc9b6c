"""Integer backend for QuantLinear: int8 x int8 -> int32 GEMMs with exact zero-point corrections.

The released DiTAS code only simulates low bits (fake quantization in float). Here a
QuantLinear of the `ditas` scheme runs on `torch._int_mm`:

    y = xq Q^T + (xq R^T) L^T + b,   xq = (ax - zx) sx,   Q[n, k] = (wq[n, k] - zw[n, g]) sw[n, g]

with activation codes ax in [0, 2^A - 1] (from the same quantizer as the fake path:
range, scale and zero point of `quant.quantizer`), weight codes wq with one (scale,
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
added in int32 too (no float cancellation when codes crowd far from 128; when the
activation zero point is extreme the same algebra runs in float64, still exact). Then

    y = sx * ( sum_g sw_g D_g  +  (A R^T + e rowsum(R)) L^T ) + b

The LoRA term is the fake path's (xq R^T) L^T in float32 with sx factored out. Remaining
differences to the fake path are float32 rounding (~1e-7 relative).

Grouped weights need one int GEMM per K-group: the group scales differ per output column,
so the int32 partials must be scaled before they are summed. Rows are processed in tiles
so that each tile's int32 partials and float accumulator stay in cache; the epilogue
(correct, scale, add, LoRA, bias) is memory-bound otherwise.

Entry points: `int8_matmul`, `quantize_act_int8`, `IntLinear.from_quantlinear`,
`linear_w8a8`, `linear_w4a8`, `to_int_backend`.
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.qlinear import QuantLinear
from quant.quantizer import affine_params, dequantize_weight, num_steps, pack_int4, unpack_int4

FAKE_HINT = "use --backend fake"
_INT32_MAX = 2 ** 31 - 1
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
    if k * 128 * 128 > _INT32_MAX:
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
# Activation quantization (the quant.quantizer quantizer, with fewer passes)
# ---------------------------------------------------------------------------

def _act_range(x2, granularity, batch):
    """(min, max) per row of x2 (M, C), shaped (M, 1) -- or (1, 1) when one range covers all.

    Separate amin/amax: torch.aminmax with a dim is ~20x slower on CPU (torch 2.13).
    """
    m = x2.shape[0]
    if granularity == "token" or (granularity == "row" and batch == m):
        return x2.amin(1, keepdim=True), x2.amax(1, keepdim=True)
    if granularity == "row" and batch > 1:
        v = x2.reshape(batch, -1)
        mn, mx = v.amin(1, keepdim=True), v.amax(1, keepdim=True)
        per = m // batch
        return mn.repeat_interleave(per, 0), mx.repeat_interleave(per, 0)
    return x2.amin().view(1, 1), x2.amax().view(1, 1)


def _batch_of(shape, granularity):
    """Leading size whose entries get their own range under "row" (the fake path's x[b])."""
    return shape[0] if granularity == "row" and len(shape) >= 2 else 1


def quantize_act_int8(x2, cfg, batch=1, inplace=False):
    """Activation codes of x2 (M, C) float32, shifted to int8: the fake path's quantizer exactly.

    x2 may be bf16/fp16 (read upcast). Returns (a, t, scale, zero): a int8 (M, C) = codes - 128,
    t the same values as float32, scale/zero (M, 1) or (1, 1) with codes = clamp(round(x/scale) + zero, 0, 2^A-1)
    bit for bit as quant.quantizer.quantize_act. `batch`: number of leading x[b] blocks
    for granularity "row" (their rows are consecutive in x2). inplace: x2 is a private
    temporary and becomes t (saves a fresh (M, C) float buffer: page faults dominate
    elementwise passes over fresh memory).
    """
    mn, mx = _act_range(x2, cfg.granularity, batch)  # exact in x2's dtype; the arithmetic is float32
    mn, mx = mn.float(), mx.float()
    scale, zero = affine_params(mn, mx, num_steps(cfg.bits, cfg.scheme))
    t = x2.div_(scale) if inplace else torch.div(x2, scale)
    t.round_()
    t.add_(zero - 128)
    t.clamp_(-128, 2 ** cfg.bits - 1 - 128)
    return t.to(torch.int8), t, scale, zero


# ---------------------------------------------------------------------------
# The prepared layer
# ---------------------------------------------------------------------------

def _unsupported(msg):
    return ValueError(f"{msg}: no integer form, {FAKE_HINT}")


class IntLinear(nn.Module):
    """A QuantLinear prepared for integer GEMMs (see the module docstring for the algebra).

    Persistent buffers (the deployable form): `codes` uint8 (out, in) for bits > 4 or
    `codes_packed` uint8 (out, in/2) (two 4-bit codes per byte) for bits <= 4; `scale`,
    `zero` (out, n_groups); bias, lora_L, lora_R, smooth (all float32 whatever the model
    dtype; dtype casts of the module are ignored, outputs follow the input's dtype).
    Non-persistent operands derived from them by `_prepare` (also after load_state_dict):
    `w_op` int8 (in, out) = B, `cb_t` int32 (n_groups, out) = CB, `d_t` (n_groups, out) = d,
    `w_scale_t` (n_groups, out), `lora_Lt` (r, out), `lora_rsum` (r,).
    Symmetric weights are the special case zw = 2^(b-1) and are supported.
    """

    def __init__(self, codes, scale, zero, weight_cfg, act_cfg, bias=None, lora_L=None, lora_R=None,
                 smooth=None):
        super().__init__()
        _check_supported(weight_cfg, act_cfg)
        self.out_features, self.in_features = codes.shape
        n, k = codes.shape
        self.weight_cfg, self.act_cfg = weight_cfg, act_cfg
        if scale.shape != zero.shape or scale.dim() != 2 or scale.shape[0] != n or k % scale.shape[1]:
            raise _unsupported(f"weight scale/zero of shape {tuple(scale.shape)} for a {n}x{k} weight "
                               "is not a layout of groups along the input dimension")
        self.n_groups = scale.shape[1]
        self.group = k // self.n_groups
        if self.group * 128 * 128 > _INT32_MAX:
            raise ValueError(f"group of {self.group} input columns can overflow the int32 accumulator")
        scale = scale.detach().float()
        zero = zero.detach().float()
        if not bool(torch.isfinite(zero).all()) or not torch.equal(zero, zero.round()):
            raise _unsupported("weight zero points are not integers")
        levels = 2 ** weight_cfg.bits - 1
        if codes.dtype != torch.uint8 or (codes.numel() and int(codes.max()) > levels):
            raise _unsupported(f"weight codes are not uint8 in [0, {levels}]")
        self.packed = weight_cfg.bits <= 4
        if self.packed:
            if k % 2:
                raise _unsupported(f"in_features {k} is odd, 4-bit codes cannot be packed")
            self.register_buffer("codes_packed", pack_int4(codes.contiguous()))
        else:
            self.register_buffer("codes", codes.clone())
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        lora_L = scale.new_zeros(n, 0) if lora_L is None else lora_L.detach().float().clone()
        lora_R = scale.new_zeros(0, k) if lora_R is None else lora_R.detach().float().clone()
        if lora_L.shape != (n, lora_R.shape[0]) or lora_R.shape[1] != k:
            raise ValueError(f"LoRA shapes {tuple(lora_L.shape)} x {tuple(lora_R.shape)} do not fit a {n}x{k} layer")
        self.register_buffer("lora_L", lora_L)
        self.register_buffer("lora_R", lora_R)
        self.register_buffer("smooth", None if smooth is None else smooth.detach().float().clone())
        self._prepare()

    @torch.no_grad()
    def _prepare(self):
        """Derive the GEMM operands from the stored codes (unpacking 4-bit codes once)."""
        codes = unpack_int4(self.codes_packed) if self.packed else self.codes
        n, k = codes.shape
        ng, g = self.n_groups, self.group
        levels = 2 ** self.weight_cfg.bits - 1
        c = self.zero.clamp(levels - 127, 128)                      # per-group offset so B fits int8
        b = codes.view(n, ng, g).to(torch.int16) - c.to(torch.int16).unsqueeze(-1)
        self.register_buffer("w_op", b.view(n, k).t().contiguous().to(torch.int8), persistent=False)
        cb = b.sum(-1, dtype=torch.int32)                            # (n, ng) column sums of B per group
        d = c - self.zero                                            # (n, ng) integers, 0 when zw fits
        self.use_sa = bool((d != 0).any())
        self.register_buffer("cb_t", cb.t().contiguous(), persistent=False)
        self.register_buffer("d_t", d.t().contiguous(), persistent=False)  # float: exact integers
        self.register_buffer("w_scale_t", self.scale.t().contiguous(), persistent=False)
        self.register_buffer("lora_Lt", self.lora_L.t().contiguous(), persistent=False)
        self.register_buffer("lora_rsum", self.lora_R.sum(1), persistent=False)
        # |int32 partial| <= g*128*128 + |e| max|CB| + max|d| g (128 + |e|): see _int_linear
        self._bound = (g * 128 * 128, float(cb.abs().max()) if cb.numel() else 0.0,
                       float(d.abs().max()) * g if d.numel() else 0.0)

    def _int32_safe(self, emax):
        p, cbm, dg = self._bound
        return p + emax * cbm + dg * (128 + emax) < _INT32_MAX

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._prepare()  # the GEMM operands derive from the loaded codes/scales/LoRA

    def _apply(self, fn, recurse=True):
        # .to(device) moves buffers; dtype casts (.half(), .bfloat16(), .to(dtype)) are ignored:
        # integer operands must stay integer and scales/LoRA float32 (outputs follow x's dtype)
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    @classmethod
    @torch.no_grad()
    def from_quantlinear(cls, ql):
        """Prepare a QuantLinear (ditas scheme, quantized activations) for integer GEMMs."""
        if not isinstance(ql, QuantLinear):
            raise TypeError(f"from_quantlinear expects a QuantLinear, got {type(ql).__name__}")
        _check_supported(ql.weight_cfg, ql.act_cfg)
        if getattr(ql, "fake_quant_only", False):
            raise _unsupported("layer weight was rescaled outside its integer codes (fake_quant_only)")
        wq = dequantize_weight(ql.qweight).to(ql.weight)
        if wq.numel() and float((wq - ql.weight).abs().max()) > (
                8 * torch.finfo(ql.weight.dtype).eps * float(ql.weight.abs().max())):
            raise _unsupported("layer weight does not match its integer codes")
        return cls(ql.codes, ql.scale, ql.zero, ql.weight_cfg, ql.act_cfg, ql.bias, ql.lora_L, ql.lora_R,
                   ql.smooth).to(ql.codes.device)

    def forward(self, x):
        return _int_linear(x, self)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rank={self.lora_R.shape[0]}, smooth={self.smooth is not None}, "
                f"groups={self.n_groups}x{self.group}, packed_int4={self.packed}, "
                f"weight_cfg={self.weight_cfg}, act_cfg={self.act_cfg}")


def _check_supported(weight_cfg, act_cfg):
    if weight_cfg.scheme != "ditas":
        raise _unsupported(f"weight scheme {weight_cfg.scheme!r} (groups span rows of one column; "
                           "its codes no longer match after folding)")
    if act_cfg is None:
        raise _unsupported("activations are not quantized (act_cfg None)")
    if act_cfg.bits > 8:
        raise _unsupported(f"{act_cfg.bits}-bit activations")


def _tile_rows(m, n, per_channel):
    """Rows per tile: the float32 accumulator tile is _TILE_BYTES per thread (threads split rows)."""
    budget = _TILE_BYTES[per_channel] * max(1, torch.get_num_threads())
    return max(16, min(m, budget // (4 * max(n, 1))))


def _int_linear(x, layer):
    """IntLinear forward: quantize x, exact integer dot products per K-group, scale, LoRA, bias.

    Per row tile and group g: P = A_g B_g (int32) + e CB_g + (SA_g + G e) d_g is the exact
    integer sum_{k in g} (ax - zx)(wq - zw) (corrected in the integer domain, so that no
    float cancellation occurs when codes crowd far from 128); o += sw_g P. Then
    o += (A R^T + e rowsum R) L^T, y = sx o + b.
    """
    shape = x.shape
    k, n = layer.in_features, layer.out_features
    if shape[-1] != k:
        raise ValueError(f"input has {shape[-1]} features, layer expects {k}")
    x2 = x.reshape(-1, k).to(torch.float32, memory_format=torch.contiguous_format)
    private = x2.data_ptr() != x.data_ptr()  # a copy we may overwrite
    if layer.smooth is not None:
        x2 = x2.div_(layer.smooth) if private else x2 / layer.smooth
        private = True
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=x2.device)
    if m:
        a, t, sx, zx = quantize_act_int8(x2, layer.act_cfg, _batch_of(shape, layer.act_cfg.granularity), private)
        ng, g = layer.n_groups, layer.group
        e = 128 - zx                                           # (M, 1) or (1, 1), integers
        # int32 partials are exact unless the activation zero point is extreme (x far from 0
        # relative to its range): then the same integer algebra runs in float64 (exact < 2^53)
        adt = torch.int32 if layer._int32_safe(float(e.abs().max())) else torch.float64
        e_c = e.to(torch.float64).to(adt).expand(m, 1)
        cb = layer.cb_t.to(adt)
        if layer.use_sa:
            d = layer.d_t.to(adt)
            # SA_g: exact in float32 (|sum| <= 128 g < 2^24); SA_g + g e exact in float64
            sae = (t.view(m, ng, g).sum(-1).to(torch.float64) + g * e.to(torch.float64)).to(adt)
        lora = layer.lora_R.shape[0] > 0
        if lora:
            lp = torch.addmm(e * layer.lora_rsum, t, layer.lora_R.t())
        if ng > 1:
            a = a.view(m, ng, g).transpose(0, 1).contiguous()     # (ng, M, G): contiguous tiles per group
        w_op, sw, bias = layer.w_op, layer.w_scale_t, layer.bias
        sx = sx.expand(m, 1)
        step = _tile_rows(m, n, ng == 1)
        for m0 in range(0, m, step):
            rows = slice(m0, m0 + step)
            o = out[rows]
            if lora:
                torch.mm(lp[rows], layer.lora_Lt, out=o)
            for j in range(ng):
                p = int8_matmul(a[rows] if ng == 1 else a[j, rows], w_op[j * g:(j + 1) * g])
                if adt is not torch.int32:
                    p = p.to(adt)
                p.addcmul_(e_c[rows], cb[j])
                if layer.use_sa:
                    p.addcmul_(sae[rows, j:j + 1], d[j])
                if j == 0 and not lora:
                    torch.mul(p, sw[0], out=o)
                else:
                    o.addcmul_(p, sw[j])
            if bias is None:
                o.mul_(sx[rows])
            else:
                torch.addcmul(bias, o, sx[rows], out=o)
    y = out.view(*shape[:-1], n)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _as_int_layer(layer):
    return layer if isinstance(layer, IntLinear) else IntLinear.from_quantlinear(layer)


def linear_w8a8(x, layer):
    """Integer forward of a layer with unpacked (5..8-bit, typically 8) weight codes.

    `layer`: an IntLinear, or a QuantLinear (prepared on the fly: slow, for one-off use).
    Per-output-channel weights (group_size None) run one int8 GEMM per row tile;
    grouped weights one per K-group.
    """
    layer = _as_int_layer(layer)
    if layer.packed:
        raise ValueError(f"{layer.weight_cfg.bits}-bit weights are packed: use linear_w4a8")
    return _int_linear(x, layer)


def linear_w4a8(x, layer):
    """Integer forward of a layer with <= 4-bit weights stored packed (two codes per byte).

    The codes were unpacked once into the int8 operand when the IntLinear was built;
    the saving is memory/checkpoint size, the compute is int8 GEMMs per K-group.
    """
    layer = _as_int_layer(layer)
    if not layer.packed:
        raise ValueError(f"{layer.weight_cfg.bits}-bit weights are not packed: use linear_w8a8")
    return _int_linear(x, layer)


def to_int_backend(model):
    """Replace every QuantLinear in `model` (in place) by its IntLinear; returns the model.

    Weight-only layers (act_cfg None, e.g. the adaLN linears of --quantize-adaln) have no integer
    activations to multiply and stay QuantLinear (their weight is dequantized once at load).
    Raises ValueError naming the layer if one has no integer form.
    """
    if isinstance(model, QuantLinear):
        return IntLinear.from_quantlinear(model)
    swaps = []
    for name, mod in model.named_modules():
        for child_name, child in mod.named_children():
            if isinstance(child, QuantLinear) and child.act_cfg is not None:
                swaps.append((mod, child_name, f"{name}.{child_name}" if name else child_name, child))
    for parent, child_name, full, child in swaps:
        try:
            setattr(parent, child_name, IntLinear.from_quantlinear(child))
        except ValueError as err:
            raise ValueError(f"{full}: {err}") from None
    return model
