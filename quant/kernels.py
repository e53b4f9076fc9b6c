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

Two kernels compute this (IntLinear's `kernel`): "fused", quant/csrc/qgemm.c through
quant/ckernel.py on x86 CPUs with AVX512-VNNI (activation ranges and codes in two passes over x,
then per K-group vpdpbusd accumulation with the corrections, scales, LoRA, bias and an optional
GELU in registers: one write of the output), and "torch" (torch._int_mm and torch ops below; CUDA,
other CPUs, and inputs whose zero points break the fused kernel's int32 bound). "auto" picks the
fused one where it runs. Both compute the same integers; their float epilogues differ in order
only (~1e-7 relative).

Entry points: `int8_matmul`, `quantize_act_int8`, `IntLinear.from_quantlinear`,
`linear_w8a8`, `linear_w4a8`, `to_int_backend`.
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant import ops_avx512 as ckernel
from quant.qlinear import QuantLinear
from quant.quantizer import affine_params, dequantize_weight, num_intervals, pack_int4, unpack_int4

FAKE_HINT = "use --backend fake"
INT_KERNELS = ("auto", "torch", "fused")
ACTIVATIONS = (None, "gelu_tanh")
_EAGER_OPERANDS = ("w_op", "cb_t", "d_t", "w_scale_t", "lora_Lt", "lora_rsum")  # what an IntLinear may apply to its output (fused into the epilogue)
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
    if granularity == "tensor" or (granularity == "row" and batch == 1):
        return x2.amin().view(1, 1), x2.amax().view(1, 1)
    return _combine_range(x2.amin(1, keepdim=True), x2.amax(1, keepdim=True), granularity, batch)


def _combine_range(mn, mx, granularity, batch):
    """Per-row (M, 1) min/max -> the granularity's ranges: (M, 1), or (1, 1) when one covers all."""
    m = mn.shape[0]
    if granularity == "token" or (granularity == "row" and batch == m):
        return mn, mx
    if granularity == "row" and batch > 1:
        per = m // batch
        return (mn.view(batch, per).amin(1, keepdim=True).repeat_interleave(per, 0),
                mx.view(batch, per).amax(1, keepdim=True).repeat_interleave(per, 0))
    return mn.amin().view(1, 1), mx.amax().view(1, 1)


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
    scale, zero = affine_params(mn.float(), mx.float(), num_intervals(cfg.bits, cfg.scheme))
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
    Non-persistent operands derived from them by `_prepare` (also after load_state_dict and device
    moves), for the torch kernel: `w_op` int8 (in, out) = B, `cb_t` int32 (n_groups, out) = CB,
    `d_t` (n_groups, out) = d, `w_scale_t` (n_groups, out), `lora_Lt` (r, out), `lora_rsum` (r,);
    for the fused one instead (those stay None): `w_vnni` (B packed for vpdpbusd) and the `f_*`
    per-column operands padded to 32-column blocks. `kernel` and `activation`: see from_quantlinear.
    Symmetric weights are the special case zw = 2^(b-1) and are supported.
    """

    def __init__(self, codes, scale, zero, weight_cfg, act_cfg, bias=None, lora_L=None, lora_R=None,
                 smooth=None, kernel="auto", activation=None):
        super().__init__()
        _check_supported(weight_cfg, act_cfg)
        if kernel not in INT_KERNELS:
            raise ValueError(f"kernel must be one of {INT_KERNELS}, got {kernel!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.kernel, self.activation = kernel, activation
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
        """Derive the GEMM operands from the stored codes: the fused kernel's where it runs, else
        torch._int_mm's (which the fused layer rebuilds on the fly in the rare fallback)."""
        ops = self._eager_build()
        cb, d = ops["cb_t"], ops["d_t"]
        g = self.group
        self.use_sa = bool((d != 0).any())
        # |int32 partial| <= g*128*128 + |e| max|CB| + max|d| g (128 + |e|): see _eager_int_linear
        self._bound = (g * 128 * 128, float(cb.abs().max()) if cb.numel() else 0.0,
                       float(d.abs().max()) * g if d.numel() else 0.0)
        self.fused = self._fused_possible(self.scale.device)
        for name in (*_EAGER_OPERANDS, "w_vnni", "f_sw", "f_cbd", "f_d", "f_Lt", "f_Rt", "f_bias"):
            self.register_buffer(name, None, persistent=False)
        if not self.fused:
            for name in _EAGER_OPERANDS:
                self.register_buffer(name, ops[name], persistent=False)
            return
        # fused kernel (quant/ckernel.py): D_g = A_g B_g + SA_g d_g - zx (CB_g + g d_g) with A the
        # uint8 codes; every per-column operand zero-padded to whole 32-column blocks
        n = self.out_features
        npad = -n // ckernel.NB * -ckernel.NB
        cbd = cb + g * d.to(torch.int32)
        self.register_buffer("w_vnni", ckernel.pack_b(ops["w_op"]), persistent=False)
        self.register_buffer("f_sw", ckernel.pad_cols(self.scale.t(), npad), persistent=False)
        self.register_buffer("f_cbd", ckernel.pad_cols(cbd, npad), persistent=False)
        if self.use_sa:
            self.register_buffer("f_d", ckernel.pad_cols(d.to(torch.int32), npad), persistent=False)
        self.register_buffer("f_Lt", ckernel.pad_cols(self.lora_L.t(), npad), persistent=False)
        rank = self.lora_R.shape[0]
        self.register_buffer("f_Rt", ckernel.pad_cols(self.lora_R.t(), -rank // 16 * -16), persistent=False)
        if self.bias is not None:
            self.register_buffer("f_bias", ckernel.pad_cols(self.bias, npad), persistent=False)
        # |int32 partial| <= g*255*128 + |zx| max|CBD| + 255 g max|d|
        self._fbound = (g * 255 * 128 + 255 * self._bound[2], float(cbd.abs().max()) if cbd.numel() else 0.0)

    @torch.no_grad()
    def _eager_build(self):
        """The torch path's operands {name: tensor} (see the class docstring), from the stored codes."""
        codes = unpack_int4(self.codes_packed) if self.packed else self.codes
        n, k = codes.shape
        levels = 2 ** self.weight_cfg.bits - 1
        c = self.zero.clamp(levels - 127, 128)                      # per-group offset so B fits int8
        b = codes.view(n, self.n_groups, self.group).to(torch.int16) - c.to(torch.int16).unsqueeze(-1)
        return {"w_op": b.view(n, k).t().contiguous().to(torch.int8),  # (K, N) = B
                "cb_t": b.sum(-1, dtype=torch.int32).t().contiguous(),  # (ng, N) column sums of B per group
                "d_t": (c - self.zero).t().contiguous(),             # (ng, N) float, exact integers; 0 when zw fits
                "w_scale_t": self.scale.t().contiguous(),
                "lora_Lt": self.lora_L.t().contiguous(),
                "lora_rsum": self.lora_R.sum(1)}

    def _eager_operands(self):
        """The torch path's operands: kept by a torch-kernel layer, rebuilt by a fused one."""
        return self._eager_build() if self.w_op is None else {name: getattr(self, name) for name in _EAGER_OPERANDS}

    def _fused_possible(self, device):
        if self.kernel == "torch":
            return False
        why = None
        if device.type != "cpu":
            why = f"device {device.type}"
        elif self.in_features % ckernel.ALIGN_K or self.group % ckernel.ALIGN_K:
            why = f"in_features {self.in_features} / group {self.group} not multiples of {ckernel.ALIGN_K}"
        elif ckernel.load() is None:
            why = ckernel.status()
        if why is not None and self.kernel == "fused":
            raise ValueError(f"fused integer kernel unavailable: {why}")
        return why is None

    def _int32_safe(self, emax):
        p, cbm, dg = self._bound
        return p + emax * cbm + dg * (128 + emax) < _INT32_MAX

    def _fused_safe(self, zmax):
        fixed, cbdm = self._fbound
        return fixed + zmax * cbdm < _INT32_MAX

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._prepare()  # the GEMM operands derive from the loaded codes/scales/LoRA

    def _apply(self, fn, recurse=True):
        # .to(device) moves buffers; dtype casts (.half(), .bfloat16(), .to(dtype)) are ignored:
        # integer operands must stay integer and scales/LoRA float32 (outputs follow x's dtype)
        device = self.scale.device
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        if self.scale.device != device:
            self._prepare()  # the operand layout depends on the device (fused kernel: CPU only)
        return self

    @classmethod
    @torch.no_grad()
    def from_quantlinear(cls, ql, kernel="auto", activation=None):
        """Prepare a QuantLinear (ditas scheme, quantized activations) for integer GEMMs.

        kernel: "auto" (the fused CPU kernel where it runs, else torch._int_mm), "torch", "fused".
        activation: None, or "gelu_tanh" to return GELU(tanh form) of the layer's output.
        """
        if not isinstance(ql, QuantLinear):
            raise TypeError(f"from_quantlinear expects a QuantLinear, got {type(ql).__name__}")
        _check_supported(ql.weight_cfg, ql.act_cfg)
        if ql.fake_quant_only:
            raise _unsupported("layer weight was rescaled outside its integer codes (fake_quant_only)")
        wq = dequantize_weight(ql.qweight).to(ql.weight)
        if wq.numel() and float((wq - ql.weight).abs().max()) > (
                8 * torch.finfo(ql.weight.dtype).eps * float(ql.weight.abs().max())):
            raise _unsupported("layer weight does not match its integer codes")
        return cls(ql.codes, ql.scale, ql.zero, ql.weight_cfg, ql.act_cfg, ql.bias, ql.lora_L, ql.lora_R,
                   ql.smooth, kernel=kernel, activation=activation).to(ql.codes.device)

    def forward(self, x):
        return _int_linear(x, self)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rank={self.lora_R.shape[0]}, smooth={self.smooth is not None}, "
                f"groups={self.n_groups}x{self.group}, packed_int4={self.packed}, fused={self.fused}, activation={self.activation}, "
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

    The fused CPU kernel where the layer prepared it (and the int32 bound holds for this input's
    activation zero points), else torch._int_mm with the epilogue in torch ops (_eager_int_linear).
    """
    shape = x.shape
    k, n = layer.in_features, layer.out_features
    if shape[-1] != k:
        raise ValueError(f"input has {shape[-1]} features, layer expects {k}")
    batch = _batch_of(shape, layer.act_cfg.granularity)
    out = None
    if layer.fused and x.numel() and x.device.type == "cpu":
        out = _fused_int_linear(x.reshape(-1, k), layer, batch)
    if out is None:
        out = _eager_int_linear(x.reshape(-1, k), layer, batch)
        if layer.activation == "gelu_tanh":
            out = F.gelu(out, approximate="tanh")
    y = out.view(*shape[:-1], n)
    return y if x.dtype == y.dtype else y.to(x.dtype)


def _fused_int_linear(x2, layer, batch):
    """quant/ckernel.py: range and codes (+ group sums, LoRA down-projection) in two passes over x,
    then one pass of u8 codes x packed int8 weights with corrections, scales, LoRA and bias in
    registers. None where this input's zero points break the kernel's int32 bound."""
    cfg = layer.act_cfg
    x2 = ckernel.rows(x2)
    mn, mx = ckernel.rowrange(x2, layer.smooth)
    mn, mx = _combine_range(mn.view(-1, 1), mx.view(-1, 1), cfg.granularity, batch)
    sx, zx = affine_params(mn, mx, num_intervals(cfg.bits, cfg.scheme))
    if not layer._fused_safe(float(zx.abs().max())):
        return None
    rank = layer.lora_R.shape[0]
    a, sa, lp = ckernel.encode(x2, layer.smooth, sx, zx, 2 ** cfg.bits - 1, layer.group if layer.use_sa else None,
                               layer.f_Rt if rank else None)
    out = torch.empty(x2.shape[0], layer.out_features,
                      dtype=torch.bfloat16 if x2.dtype == torch.bfloat16 else torch.float32)
    return ckernel.qgemm(a, layer.w_vnni, layer.out_features, layer.group, layer.f_sw, layer.f_cbd, layer.f_d, sa,
                         zx.to(torch.int32).reshape(-1), sx.reshape(-1).contiguous(), lp, rank, layer.f_Lt,
                         layer.f_bias, out, gelu=layer.activation == "gelu_tanh")


def _eager_int_linear(x2, layer, batch):
    """torch._int_mm per K-group and row tile; float32 (M, N) out.

    Per row tile and group g: P = A_g B_g (int32) + e CB_g + (SA_g + G e) d_g is the exact
    integer sum_{k in g} (ax - zx)(wq - zw) (corrected in the integer domain, so that no
    float cancellation occurs when codes crowd far from 128); o += sw_g P. Then
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
    ops = layer._eager_operands()
    ng, g = layer.n_groups, layer.group
    e = 128 - zx                                           # (M, 1) or (1, 1), integers
    # int32 partials are exact unless the activation zero point is extreme (x far from 0
    # relative to its range): then the same integer algebra runs in float64 (exact < 2^53)
    adt = torch.int32 if layer._int32_safe(float(e.abs().max())) else torch.float64
    e_c = e.to(torch.float64).to(adt).expand(m, 1)
    cb = ops["cb_t"].to(adt)
    if layer.use_sa:
        d = ops["d_t"].to(adt)
        # SA_g: exact in float32 (|sum| <= 128 g < 2^24); SA_g + g e exact in float64
        sae = (t.view(m, ng, g).sum(-1).to(torch.float64) + g * e.to(torch.float64)).to(adt)
    lora = layer.lora_R.shape[0] > 0
    if lora:
        lp = torch.addmm(e * ops["lora_rsum"], t, layer.lora_R.t())
    if ng > 1:
        a = a.view(m, ng, g).transpose(0, 1).contiguous()     # (ng, M, G): contiguous tiles per group
    w_op, sw, bias = ops["w_op"], ops["w_scale_t"], layer.bias
    sx = sx.expand(m, 1)
    step = _tile_rows(m, n, ng == 1)
    for m0 in range(0, m, step):
        rows = slice(m0, m0 + step)
        o = out[rows]
        if lora:
            torch.mm(lp[rows], ops["lora_Lt"], out=o)
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
    return out


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


def to_int_backend(model, kernel="auto"):
    """Replace every QuantLinear in `model` (in place) by its IntLinear; returns the model.

    kernel: see IntLinear.from_quantlinear. In a DiT Mlp (fc1 -> GELU(tanh) -> fc2) the GELU moves
    into fc1's epilogue (IntLinear activation "gelu_tanh", computed in float32 before the output
    is rounded to the model's dtype) and the Mlp's act becomes Identity.
    Weight-only layers (act_cfg None, e.g. the adaLN linears of --quantize-adaln) have no integer
    activations to multiply and stay QuantLinear (their weight is dequantized once at load).
    Raises ValueError naming the layer if one has no integer form.
    """
    from models import Mlp

    if isinstance(model, QuantLinear):
        return IntLinear.from_quantlinear(model, kernel)
    swaps = []
    for name, mod in model.named_modules():
        for child_name, child in mod.named_children():
            if isinstance(child, QuantLinear) and child.act_cfg is not None:
                fuse = (isinstance(mod, Mlp) and child_name == "fc1" and isinstance(mod.act, nn.GELU)
                        and mod.act.approximate == "tanh")
                swaps.append((mod, child_name, f"{name}.{child_name}" if name else child_name, child, fuse))
    for parent, child_name, full, child, fuse in swaps:
        try:
            setattr(parent, child_name, IntLinear.from_quantlinear(child, kernel, "gelu_tanh" if fuse else None))
        except ValueError as err:
            raise ValueError(f"{full}: {err}") from None
        if fuse:
            parent.act = nn.Identity()
    return model
