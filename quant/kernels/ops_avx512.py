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

The C files are compiled with the system C compiler (`$CC`, else gcc/cc) into a cache directory
($DITAS_CACHE, else $XDG_CACHE_HOME/ditas, else ~/.cache/ditas), keyed by a hash of the sources,
flags and compiler, then loaded with ctypes. Its OpenMP runtime is torch's own libgomp (same
soname), so its threads are torch's. Where there is no compiler, no AVX512-VNNI, or
DITAS_CKERNEL=0, `load()` returns None and the torch ops run instead (quant/kernels/ops_torch.py) (same results;
`status()` says why).
"""
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess

import torch
import torch.nn.functional as F

from quant.io.files import atomic_path
from quant.kernels.ops_torch import INT32_MAX, combine_range
from quant.method.quantizer import affine_params, num_intervals

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCES = tuple(os.path.join(CSRC, f) for f in ("int_linear.c", "alpha_search_bf16.c", "weight_quant.c"))
HEADERS = (os.path.join(CSRC, "ditas_simd.h"),)
NB = 32          # columns per packed block (both kernels)
QR = 4           # rows per LoRA block of ditas_encode
ALIGN_K = 4      # vpdpbusd consumes 4 consecutive K values per int32 lane
ALIGN_K4 = 8     # pack_b4: one byte holds two of them (K and the group a multiple of 8)
FLAGS = ("-O3", "-std=c11", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx512bf16",
         "-fopenmp", "-shared", "-fPIC", f"-DDITAS_NB={NB}", f"-DDITAS_QR={QR}", f"-I{CSRC}")
_I, _P = ctypes.c_int64, ctypes.c_void_p
# The C entry points' parameters, by name, as declared in csrc/*.c (tests/test_kernels.py checks
# them against the C prototypes): int64_t -> c_int64, any pointer -> c_void_p.
PROTOTYPES = {
    "ditas_qgemm": (("M", _I), ("N", _I), ("Npad", _I), ("K", _I), ("G", _I), ("A", _P), ("lda", _I), ("Bp", _P),
                    ("sw", _P), ("cbd", _P), ("dq", _P), ("sa", _P), ("zx", _P), ("zs", _I), ("sx", _P), ("ss", _I),
                    ("lp", _P), ("lpld", _I), ("r", _I), ("Lt", _P), ("bias", _P), ("out", _P), ("ldo", _I),
                    ("out_bf16", _I), ("gelu", _I), ("nthreads", _I)),
    "ditas_qgemm_w4": (("M", _I), ("N", _I), ("Npad", _I), ("K", _I), ("G", _I), ("A", _P), ("lda", _I),
                       ("Bp4", _P), ("sw", _P), ("cbd", _P), ("dq", _P), ("sa", _P), ("zx", _P), ("zs", _I),
                       ("sx", _P), ("ss", _I), ("lp", _P), ("lpld", _I), ("r", _I), ("Lt", _P), ("bias", _P),
                       ("out", _P), ("ldo", _I), ("out_bf16", _I), ("gelu", _I), ("nthreads", _I)),
    "ditas_rowrange": (("M", _I), ("K", _I), ("x", _P), ("ldx", _I), ("x_bf16", _I), ("s", _P), ("mn", _P),
                       ("mx", _P), ("nthreads", _I)),
    "ditas_encode": (("M", _I), ("K", _I), ("x", _P), ("ldx", _I), ("x_bf16", _I), ("s", _P), ("scale", _P),
                     ("ss", _I), ("zero", _P), ("zs", _I), ("levels", _I), ("a", _P), ("G", _I), ("sa", _P),
                     ("Rt", _P), ("rpad", _I), ("lp", _P), ("scratch", _P), ("nthreads", _I)),
    "ditas_quant_residual": (("rows", _I), ("K", _I), ("G", _I), ("W", _P), ("LR", _P), ("levels", _I),
                             ("codes", _P), ("scale", _P), ("zero", _P), ("E", _P), ("nthreads", _I)),
    "ditas_ref_losses": (("n", _I), ("rows", _I), ("r0", _I), ("c", _I), ("w", _I), ("k", _I), ("x", _P),
                         ("s", _P), ("sc", _P), ("top", _P), ("Mp", _P), ("partner", _P), ("pw", _I), ("split", _I),
                         ("E", _P), ("part", _P), ("nthreads", _I)),
}


def _cache_dir():
    if os.environ.get("DITAS_CACHE"):
        return os.environ["DITAS_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ditas")


def _compiler():
    for cc in (os.environ.get("CC"), "gcc", "cc"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


def _build(cc):
    """Path of the compiled library (built once per source/flags/compiler); raises OSError/CalledProcessError."""
    src = b"".join(open(f, "rb").read() for f in SOURCES + HEADERS)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(src + repr((FLAGS, cc, version)).encode()).hexdigest()[:16]
    cache = _cache_dir()
    path = os.path.join(cache, f"ditas_kernels-{key}.so")
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        with atomic_path(path, suffix=".so") as tmp:  # build beside, rename: no half-written library
            subprocess.run([cc, *FLAGS, *SOURCES, "-o", tmp], capture_output=True, text=True, check=True)
    return path


@functools.lru_cache(maxsize=None)
def _load():
    """(library or None, reason)."""
    if os.environ.get("DITAS_CKERNEL", "1") == "0":
        return None, "disabled by DITAS_CKERNEL=0"
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return None, f"CPU capability {torch.backends.cpu.get_cpu_capability()} (needs AVX512-VNNI)"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (set CC)"
    try:
        lib = ctypes.CDLL(_build(cc))
    except subprocess.CalledProcessError as e:
        return None, f"compiling {', '.join(map(os.path.basename, SOURCES))} failed: {(e.stderr or '').strip().splitlines()[-1:]}"
    except OSError as e:
        return None, f"building or loading the kernel failed: {e}"
    if not lib.ditas_qgemm_supported():
        return None, "CPU lacks AVX512-VNNI"
    for name, params in PROTOTYPES.items():
        getattr(lib, name).argtypes = [ctype for _, ctype in params]
        getattr(lib, name).restype = None
    return lib, "ok"


def load():
    """The loaded library, or None where it cannot run here."""
    return _load()[0]


def status():
    """'ok' or why the fused kernel is not used."""
    return _load()[1]


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
    """(min, max) over each row of x2 / smooth (x2 from rows()): float32 (M,) each, exactly torch's values."""
    m, k = x2.shape
    mn, mx = torch.empty(m), torch.empty(m)
    load().ditas_rowrange(m, k, x2.data_ptr(), x2.stride(0), int(x2.dtype == torch.bfloat16), _ptr(smooth),
                          mn.data_ptr(), mx.data_ptr(), torch.get_num_threads())
    return mn, mx


def encode(x2, smooth, scale, zero, levels, group=None, rt=None):
    """Activation codes of x2 / smooth (x2 from rows()), as quant.method.quantizer.quantize_act bit for bit.

    scale, zero: float32 with M or 1 elements. Returns (a uint8 (M, K), sa int32 (M, K/group) row sums
    per group or None, lp float32 (M, rpad) = (a - zero) @ rt or None) for rt (K, rpad), rpad % 16 == 0.
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
    """out (M, N) float32 or bf16 <- the fused linear (see csrc/int_linear.c); every operand prepared by the caller.

    a uint8 (M, K) with unit column stride; bp from pack_b (int8: ditas_qgemm) or pack_b4 (uint8:
    ditas_qgemm_w4); sw/cbd/dq (ng, Npad), dq None where it is 0; sa int32 (M, ng) or None (with dq);
    zx int32 and sx float32 of M or 1 elements; lp float32 (M, >= r) or None with the LoRA rank r;
    lt (r, Npad); bias (Npad) or None. gelu: apply GELU (tanh form) to the result.
    """
    m, k = a.shape
    npad = bp.shape[0] * NB
    r = 0 if lp is None else r
    entry = load().ditas_qgemm_w4 if bp.dtype == torch.uint8 else load().ditas_qgemm
    entry(m, n, npad, k, group, a.data_ptr(), a.stride(0), bp.data_ptr(), sw.data_ptr(),
                       cbd.data_ptr(), _ptr(dq), _ptr(sa), zx.data_ptr(), int(zx.numel() > 1), sx.data_ptr(),
                       int(sx.numel() > 1), _ptr(lp), 0 if lp is None else lp.stride(0), r,
                       _ptr(lt) if r else None, _ptr(bias), out.data_ptr(), out.stride(0),
                       int(out.dtype == torch.bfloat16), int(gelu), torch.get_num_threads())
    return out


def w4_operands(codes, scale, zero, lora_L, lora_R, bias=None):
    """ditas_qgemm_w4's weight side of a grouped <= 4-bit weight, from its stored form.

        codes   uint8 (N, K) in [0, 15], K and the group G = K / ng multiples of ALIGN_K4
        scale   float32 (N, ng); zero float32 (N, ng) integer zero points zw
        lora_L  float32 (N, r), lora_R float32 (r, K) (r may be 0); bias float32 (N,) or None
    Returns ({w_vnni4 (pack_b4 of the raw codes), f_sw float32 / f_cbd int32 / f_d int32 (ng, Npad),
    f_Lt (r, Npad), f_Rt (K, rpad), f_bias (Npad) or absent; f_d absent where every zw is 0}, int32 bound
    (g 255 max(codes) + 255 g max|zw|, max|CBD|)) with c = 0: d = -zw, CBD_g = sum_{k in g} (codes - zw);
    per-column operands zero-padded to whole 32-column blocks.
    """
    n, k = codes.shape
    ng = scale.shape[1]
    g = k // ng
    npad = -n // NB * -NB
    zw = zero.to(torch.int32)
    cbd = codes.view(n, ng, g).sum(-1, dtype=torch.int32) - g * zw
    rank = lora_R.shape[0]
    out = {"w_vnni4": pack_b4(codes), "f_sw": pad_cols(scale.t(), npad), "f_cbd": pad_cols(cbd.t(), npad),
           "f_Lt": pad_cols(lora_L.t(), npad), "f_Rt": pad_cols(lora_R.t(), -rank // 16 * -16)}
    if bool((zw != 0).any()):
        out["f_d"] = pad_cols((-zw).t(), npad)
    if bias is not None:
        out["f_bias"] = pad_cols(bias.float(), npad)
    bmax = int(codes.max()) if codes.numel() else 0
    zmax = float(zw.abs().max()) if zw.numel() else 0.0
    return out, (g * 255 * bmax + 255 * g * zmax, float(cbd.abs().max()) if cbd.numel() else 0.0)


def fused_safe(bound, zx_max):
    """Do the int32 partials fit for activation zero points up to zx_max in magnitude (bound: prepare's)?"""
    return bound[0] + zx_max * bound[1] < INT32_MAX


def prepare(layer, codes, ops):
    """({name: tensor}, int32 bound) of an IntLinear on this kernel, from its codes uint8 (N, K) and the
    torch path's operands `ops` (quant/kernels/ops_torch.py: cb_t, d_t, w_op).

    D_g = A_g B_g + SA_g d_g - zx CBD_g with A the uint8 activation codes, B = codes - c, d = c - zw and
    CBD_g = sum_{k in g} (codes - zw) = CB_g + g d_g for the torch path's offset c; packed weights run
    on the raw codes instead (w4_operands: c = 0, d = -zw). Every per-column operand is zero-padded to
    whole 32-column blocks. The bound: |int32 partial| <= g*255*max|B| + 255 g max|d| + |zx| max|CBD|.
    """
    if layer.packed:
        return w4_operands(codes, layer.scale, layer.zero, layer.lora_L, layer.lora_R, layer.bias)
    g, n = layer.group, layer.out_features
    npad = -n // NB * -NB
    d = ops["d_t"]
    cbd = ops["cb_t"] + g * d.to(torch.int32)
    out = {"w_vnni": pack_b(ops["w_op"])}
    out["f_sw"], out["f_cbd"] = pad_cols(layer.scale.t(), npad), pad_cols(cbd, npad)
    if bool((d != 0).any()):
        out["f_d"] = pad_cols(d.to(torch.int32), npad)
    rank = layer.lora_R.shape[0]
    out["f_Lt"], out["f_Rt"] = pad_cols(layer.lora_L.t(), npad), pad_cols(layer.lora_R.t(), -rank // 16 * -16)
    if layer.bias is not None:
        out["f_bias"] = pad_cols(layer.bias, npad)
    dmax = float(d.abs().max()) if d.numel() else 0.0
    return out, (g * 255 * 128 + 255 * g * dmax, float(cbd.abs().max()) if cbd.numel() else 0.0)


def fused_linear(x2, layer, batch):
    """An IntLinear's forward in two C passes: range and codes (+ group sums, LoRA down-projection) over
    x, then u8 codes x packed weights with corrections, scales, LoRA and bias in registers.

        x2      (M, K) float32/bf16/fp16 input rows; batch: leading x[b] blocks (row granularity)
        layer   an IntLinear prepared for this kernel: act_cfg, smooth (K,) or None, group,
                w_vnni (pack_b of B) or w_vnni4 (pack_b4 of the raw codes), f_sw float32 / f_cbd int32 /
                f_d int32 or None where d = 0 (ng, Npad), f_Rt (K, rpad), f_Lt (r, Npad), f_bias (Npad)
                or None, activation, out_features, _fused_safe
    Returns (M, N) bf16 for bf16 input, else float32; None where this input's activation zero points
    break the kernel's int32 bound (the caller falls back to the torch ops).
    """
    cfg = layer.act_cfg
    x2 = rows(x2)
    mn, mx = rowrange(x2, layer.smooth)
    mn, mx = combine_range(mn.view(-1, 1), mx.view(-1, 1), cfg.granularity, batch)
    sx, zx = affine_params(mn, mx, num_intervals(cfg.bits, cfg.scheme))
    if not layer._fused_safe(float(zx.abs().max())):
        return None
    rank = layer.lora_R.shape[0]
    a, sa, lp = encode(x2, layer.smooth, sx, zx, 2 ** cfg.bits - 1, None if layer.f_d is None else layer.group,
                       layer.f_Rt if rank else None)
    out = torch.empty(x2.shape[0], layer.out_features,
                      dtype=torch.bfloat16 if x2.dtype == torch.bfloat16 else torch.float32)
    bp = layer.w_vnni if layer.w_vnni4 is None else layer.w_vnni4
    return qgemm(a, bp, layer.out_features, layer.group, layer.f_sw, layer.f_cbd, layer.f_d, sa,
                 zx.to(torch.int32).reshape(-1), sx.reshape(-1).contiguous(), lp, rank, layer.f_Lt,
                 layer.f_bias, out, gelu=layer.activation == "gelu_tanh")


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
