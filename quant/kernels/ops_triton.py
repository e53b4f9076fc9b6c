"""Triton wrappers of the integer backend: W8A8 / W4A8 linears with quant/kernels/ops_torch.py's exact integer algebra.

The kernels themselves (@triton.jit) are in quant/kernels/triton_kernels.py (imported here where triton imports):

    act_range_kernel    per-row min/max of x / smooth (then torch: granularity ranges, affine_params -> sx, zx)
    act_encode_kernel   uint8 codes ax = quant.method.quantizer's bit for bit, per-K-group code sums S_g,
                        lp = (ax - zx) R^T
    int_gemm_kernel     per K-group int8 tl.dot of A = ax - 128, B = wq - c into int32, exact corrections, epilogue

This module holds what launches them: `prepare` / `prepare_layer` (a layer's weight side, `Operands`), the launch
table (`gemm_launch`, `act_launch`), `quantize_act` + `gemm` = `linear`. CUDA tensors, or CPU tensors with
TRITON_INTERPRET=1 set before this module is imported.
"""
import functools
import os
from dataclasses import dataclass

import torch

from quant.kernels.ops_torch import INT32_MAX, b_operand, combine_range, int32_bound, int32_emax, offsets
from quant.method.quantizer import affine_params, num_intervals, unpack_int4

try:
    import triton
    _IMPORT_ERROR = None
except Exception as err:  # not installed, or a broken install
    triton = None
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
    from quant.kernels.triton_kernels import act_encode_kernel, act_range_kernel, int_gemm_kernel


def _need():
    if not available():
        raise RuntimeError(f"Triton kernels unavailable: {status()}")


def _pow2(n, lo=16):
    return max(lo, 1 << (int(n) - 1).bit_length())


# ---------------------------------------------------------------------------
# Launch configurations: a fixed table by shape (docs/METHOD.md §13, the integer kernels on CUDA)
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Launch:
    """A kernel's tiles and its CUDA launch options (the interpreter ignores num_warps / num_stages)."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def gemm_launch(m, n, group, arch=90):
    """The integer GEMM's launch for M rows, N output columns, K-groups of `group` columns, on compute capability
    `arch` (90: H100/H200, 80: A100), from a fixed table (no autotuning: the same launch on every run):

        BLOCK_K   2^i covering the group, 32 to 128 (an int8 tl.dot needs K >= 32 on NVIDIA; smaller groups are
                  masked); a group of at most BLOCK_K is one step, so the loop over groups is what is pipelined
        M >= 1024 128 x 128 tiles, 8 warps (two warpgroups: wgmma m64n128k32 on sm_90)
        M >= 64   64 x 128 tiles on sm_90 (one warpgroup), 64 x 64 on sm_80, 4 warps
        M < 64    one 16/32-row tile, 64 columns, 4 warps (mma.sync)
    Three pipeline stages: at most 96 KiB of shared memory (sm_80 has 163 KiB, sm_90 227 KiB). N enters only
    through the grid. tests/test_ops_triton.py compiles every launch DiT-S/2 and DiT-XL/2 can get for sm_90 and sm_80.
    """
    bk = max(32, min(128, _pow2(group)))
    if m >= 1024:
        return Launch(128, 128, bk, 8, 3)
    if m >= 64:
        return Launch(64, 128 if arch >= 90 else 64, bk, 4, 3)
    return Launch(_pow2(m), 64, bk, 4, 3)


@functools.lru_cache(maxsize=None)
def _arch(device):
    """Compute capability as 90 / 80 of a CUDA device (90 for the interpreter: its tiles only)."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def act_launch(k, group):
    """The activation pass's launch: 16 rows a program (the LoRA dot's minimum), the range pass over up to 128
    columns a step (block_n), the encode pass over up to 64 columns of a group a step (block_k; >= 16 for the
    float32 dot)."""
    return Launch(16, min(128, _pow2(k)), max(16, min(64, _pow2(group))), 4, 2)


@dataclass
class Operands:
    """A layer's prepared weight side (N out, K in, G columns per group, NG = K / G, r LoRA rank):
    w:       int8 (N, K) = codes - c (bits 5..8) | uint8 (N, K/2) packed codes (bits <= 4, the stored tensor itself)
    c:       int16 (NG, N) offsets (packed only);  cb: int32 (NG, N) column sums of B per group
    d:       int32 (NG, N) = c - zw (None if all 0);  scale: float32 (N, NG), the layer's own
    lora_L:  float32 (N, r), lora_R: float32 (r, K) (None without LoRA), the layer's own;  bias: float32 (N,) or None
    emax:    the largest |128 - zx| for which the int32 partials cannot overflow (larger: int64, in the kernel)
    """
    bits: int
    k: int
    group: int
    w: torch.Tensor
    c: torch.Tensor | None
    cb: torch.Tensor
    d: torch.Tensor | None
    scale: torch.Tensor
    lora_L: torch.Tensor | None
    lora_R: torch.Tensor | None
    bias: torch.Tensor | None
    emax: int

    n = property(lambda self: self.scale.shape[0])
    n_groups = property(lambda self: self.k // self.group)
    packed = property(lambda self: self.bits <= 4)
    rank = property(lambda self: 0 if self.lora_R is None else self.lora_R.shape[0])

    def resident_bytes(self):
        """Bytes of what the GEMM reads: {"weights", "groups", "lora", "bias"}."""
        nb = lambda *ts: sum(t.numel() * t.element_size() for t in ts if t is not None)  # noqa: E731
        return {"weights": nb(self.w), "groups": nb(self.c, self.cb, self.d, self.scale),
                "lora": nb(self.lora_L, self.lora_R), "bias": nb(self.bias)}


@torch.no_grad()
def prepare(codes_or_packed, bits, scale, zero, lora_L=None, lora_R=None, bias=None, group=None):
    """Weight operands for `gemm` / `linear` (ditas weight scheme); float32 contiguous inputs are kept, not copied:
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
    f32 = lambda t: None if t is None else t.detach().float().contiguous()  # noqa: E731
    rank = 0 if lora_R is None else lora_R.shape[0]
    if rank and (lora_L.shape != (n, rank) or lora_R.shape != (rank, k)):
        raise ValueError(f"LoRA shapes {tuple(lora_L.shape)} x {tuple(lora_R.shape)} do not fit {n}x{k}")
    emax = int32_emax(int32_bound({"cb_t": cb, "d_t": d}, g))
    if bits > 4:  # B itself, int8 (N, K); packed weights are unpacked and offset in the kernel
        w = b_operand(codes, c)
    return Operands(bits, k, g, w.contiguous(), c.t().to(torch.int16).contiguous() if bits <= 4 else None, cb,
                    d if bool((d != 0).any()) else None, f32(scale), f32(lora_L) if rank else None,
                    f32(lora_R) if rank else None, f32(bias), emax)


def prepare_layer(layer):
    """`prepare` of a quant.nn.int_linear.IntLinear's declared state:

        layer   codes_packed uint8 (N, K/2) (bits <= 4, kept as the operand) or weight_codes() uint8 (N, K);
                scale, zero float32 (N, NG); lora_L float32 (N, r), lora_R float32 (r, K) (r may be 0); bias float32
                (N,) or None; weight_cfg.bits; group G
    ->  Operands
    """
    rank = layer.lora_R.shape[0]
    return prepare(layer.codes_packed if layer.packed else layer.weight_codes(), layer.weight_cfg.bits, layer.scale,
                   layer.zero, layer.lora_L if rank else None, layer.lora_R if rank else None, layer.bias, layer.group)


def quantize_act(x2, bits=8, scheme="ditas", granularity="tensor", batch=1, smooth=None, group=None, lora_R=None):
    """The activation pass: quant.method.quantizer's codes of x2 / smooth, group code sums, LoRA down-projection:
    x2:      float32 | bfloat16 | float16 (M, K), any strides, read upcast to float32
    smooth:  float32 (K,) divisor or None;  granularity, batch: as quant.kernels.ops_torch.quantize_act_int8
    group:   G of the code sums (None: G = K);  lora_R: float32 (r, K) contiguous (Operands.lora_R) or None
    ->       a int8 (M, K) = codes - 128, gsum int32 (M, K/G) code sums per group, lp float32 (M, RP) =
             (codes - zx) R^T zero-padded to RP = 2^i >= 16 columns, or None; sx / zx float32 (M,) scale / integer
             zero point. No host sync.
    """
    _need()
    (m, k), dev = x2.shape, x2.device
    g = k if group is None else group
    if g < 1 or k % g:
        raise ValueError(f"group {group} does not divide K = {k}")
    rank = 0 if lora_R is None else lora_R.shape[0]
    a = torch.empty(m, k, dtype=torch.int8, device=dev)
    gsum = torch.empty(m, k // g, dtype=torch.int32, device=dev)
    lp = torch.empty(m, _pow2(rank), dtype=torch.float32, device=dev) if rank else None
    if not m:
        return a, gsum, lp, torch.ones(0, device=dev), torch.zeros(0, device=dev)
    s = None if smooth is None else smooth.float().contiguous()
    mn, mx = torch.empty(m, dtype=torch.float32, device=dev), torch.empty(m, dtype=torch.float32, device=dev)
    run = act_launch(k, g)
    grid = (triton.cdiv(m, run.block_m),)
    act_range_kernel[grid](x2, mn if s is None else s, mn, mx, m, k, x2.stride(0), x2.stride(1),
                            HAS_SMOOTH=s is not None, BLOCK_M=run.block_m, BLOCK_K=run.block_n,
                            num_warps=run.num_warps, num_stages=run.num_stages)
    mn, mx = combine_range(mn.view(-1, 1), mx.view(-1, 1), granularity, batch)
    sx, zx = (t.expand(m, 1).reshape(m).contiguous() for t in affine_params(mn, mx, num_intervals(bits, scheme)))
    act_encode_kernel[grid](
        x2, sx if s is None else s, sx, zx, a, gsum, lora_R if rank else sx, lp if rank else sx, m, k, g, k // g, rank,
        x2.stride(0), x2.stride(1), float(2 ** bits - 1), HAS_SMOOTH=s is not None, HAS_LORA=rank > 0,
        RANK_P=_pow2(rank), BLOCK_M=run.block_m, BLOCK_K=run.block_k, num_warps=run.num_warps,
        num_stages=run.num_stages)
    return a, gsum, lp, sx, zx


def gemm(a, gsum, lp, sx, zx, ops, activation=None, out_dtype=torch.float32, launch=None):
    """y = sx (sum_g sw_g D_g + lp L^T) + bias, optionally GELU(tanh): the integer GEMM and its epilogue:
    a:      int8 (M, K) = codes - 128; gsum: int32 (M, NG); lp: float32 (M, RP) | None; sx, zx: float32 (M,)
            (quantize_act's);  launch: Launch, None = gemm_launch(M, N, G)
    ->      (M, N) out_dtype, torch.float32 or torch.bfloat16. No host sync: whether a row block's corrections need
            int64 is decided in the kernel from |128 - zx| against ops.emax.
    """
    _need()
    if activation not in ACTIVATIONS or out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"activation must be one of {ACTIVATIONS} (got {activation!r}) and out_dtype torch.float32 "
                         f"or torch.bfloat16 (got {out_dtype})")
    m, k = a.shape
    if k != ops.k or a.dtype != torch.int8:
        raise ValueError(f"activation operand {a.dtype} {tuple(a.shape)}, the weight expects int8 (M, {ops.k})")
    out = torch.empty(m, ops.n, dtype=out_dtype, device=a.device)
    if not m or not ops.n:
        return out
    run = gemm_launch(m, ops.n, ops.group, _arch(a.device)) if launch is None else launch
    e = (128 - zx.double()).to(torch.int64)
    dummy = ops.scale  # for pointers a kernel variant never reads
    args = (a, ops.w, dummy if ops.c is None else ops.c, ops.cb, dummy if ops.d is None else ops.d, ops.scale, gsum,
            e, sx, dummy if lp is None else lp, dummy if ops.lora_L is None else ops.lora_L,
            dummy if ops.bias is None else ops.bias, out, m, ops.n, k, ops.group, ops.n_groups, ops.rank, ops.emax)
    flags = dict(ONE_STEP=ops.group <= run.block_k, PACKED=ops.packed, USE_SA=ops.d is not None, HAS_LORA=ops.rank > 0,
                 RANK_P=_pow2(ops.rank), HAS_BIAS=ops.bias is not None, GELU=activation == "gelu_tanh",
                 OUT_BF16=out_dtype == torch.bfloat16, BLOCK_M=run.block_m, BLOCK_N=run.block_n, BLOCK_K=run.block_k,
                 num_warps=run.num_warps, num_stages=run.num_stages)
    row_blocks = triton.cdiv(m, run.block_m)
    int_gemm_kernel[(row_blocks, triton.cdiv(ops.n, run.block_n))](*args, WIDE=False, **flags)
    int_gemm_kernel[(row_blocks,)](*args, WIDE=True, **flags)  # the row blocks the first skipped, if any
    return out


def linear(x2, ops, act_granularity="tensor", act_bits=8, act_scheme="ditas", batch=1, smooth=None,
           activation=None, out_dtype=None):
    """Integer W8A8 / W4A8 linear: quantize_act + gemm (quant.nn.int_linear.IntLinear's forward, on Triton):
    x2:        float32 | bfloat16 | float16 (M, K);  ops: Operands (prepare / prepare_layer)
    batch:     leading x[b] blocks of act_granularity "row" (quant.kernels.ops_torch.batch_of of the original shape)
    smooth:    float32 (K,) or None;  activation: None | "gelu_tanh";  out_dtype: None = bf16 for bf16 input, else fp32
    ->         (M, N) out_dtype
    """
    if x2.dim() != 2 or x2.shape[1] != ops.k:
        raise ValueError(f"input of shape {tuple(x2.shape)}, layer expects (M, {ops.k})")
    if out_dtype is None:
        out_dtype = torch.bfloat16 if x2.dtype == torch.bfloat16 else torch.float32
    a, gsum, lp, sx, zx = quantize_act(x2, act_bits, act_scheme, act_granularity, batch, smooth, ops.group,
                                       ops.lora_R)
    return gemm(a, gsum, lp, sx, zx, ops, activation, out_dtype)
