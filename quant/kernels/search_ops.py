"""The calibration's fused CPU kernels as the method code calls them (the AVX512 C of quant/kernels/ops_avx512.py):
the alpha search's two fused loss evaluations (quant/search/losses.py) and the LoRA loop's quantize-and-residual
step (quant/method/lora.py). Each returns what the torch path it replaces computes (the same integers and float
epilogue, or the same bf16 products), so the engine's sums do not depend on which one ran.

Notation (every tensor on the CPU):

    n       rows scored in one call (a block of a step's rows);  rows: the rows of the whole step
    C       the layer's input channels (in);  out: its output channels;  k: candidates evaluated together
    W       columns of the reference scheme's candidate matrix M (in, or out for a tall layer)
    r       a candidate's LoRA rank;  ng: its weight groups;  G = C / ng columns per group

    x2      float32 (rows, C) a step's rows;  s float32 (k, C) the candidates' smoothing factors (one: (C,))
    ranges  (scale, top) float32 (k, rows) each: every candidate's activation scale and qmax - zero per row
    m       float (C, W) the shared candidate matrix;  m_packed: bf16_pack(m)
    partner float32 (rows, W): X N M^T (split) or P = X N (quant/search/losses.py's shared-weight algebra)
    sx, zx  float32 (n,) each: the rows' activation scale and zero point of one candidate
    y_fp    float32 (n, out): the FP reference rows (x W^T, or the layer's output with its bias)
    w       float32 (N, K) contiguous weight rows;  lr float32 (N, K) or None: the LoRA product subtracted
"""
import torch

from quant.kernels import ops_avx512



def fused_safe(bound, zx_max):
    """Do the int32 partials fit for activation zero points up to zx_max in magnitude (w4_candidate's bound)?"""
    return ops_avx512.fused_safe(bound, zx_max)


def rowrange(x2, s):
    """(min, max) float32 (n,) each of every row of x2 / s (s (C,) contiguous), exactly torch's values."""
    return ops_avx512.rowrange(x2, s)


def bf16_ok():
    """Can bf16_ref_losses run here (the library and AVX512-BF16)?"""
    return ops_avx512.bf16_ok()


def quant_residual(w, lr, group, levels):
    """One round-to-nearest step of the LoRA loop (csrc/weight_quant.c): w float32 (N, K) contiguous, lr like w
    (L @ R, subtracted) or None, G = group columns per group, levels = 2^bits - 1. Returns codes uint8 (N, K),
    scale and zero float32 (N, K / G) of w - lr, E = w - dequant(codes) float32 (N, K)."""
    return ops_avx512.quant_residual(w, lr, group, levels)


def available():
    """Is the kernel library loaded (a C compiler, AVX512-VNNI, DITAS_CKERNEL not 0)?"""
    return ops_avx512.load() is not None


def w4_fits(weight_bits, act_bits, inp, n_groups):
    """Do a layer's candidates run on ditas_qgemm_w4 here: <= 4-bit grouped codes (groups a multiple of
    ALIGN_K4 wide), 8-bit activations, the library loaded?"""
    return (weight_bits <= 4 and act_bits == 8 and n_groups > 0
            and (inp // n_groups) % ops_avx512.ALIGN_K4 == 0 and available())


def w4_candidate(qweight, lora_L, lora_R, bias):
    """(operands, int32 bound, G, r) of one candidate on ditas_qgemm_w4.

        qweight  QWeight: codes uint8 (out, C) in [0, 15], scale / zero float32 (out, ng)
        lora_L   float32 (out, r);  lora_R float32 (r, C) (r may be 0);  bias float32 (out,) or None
    """
    ops, bound = ops_avx512.w4_operands(qweight.codes, qweight.scale, qweight.zero, lora_L, lora_R, bias)
    return ops, bound, qweight.codes.shape[1] // qweight.scale.shape[-1], lora_R.shape[0]


def w4_residual(xb, s, sx, zx, candidate, qmax, y_fp):
    """fq(xb / s) (Q + L R)^T (+ b) - y_fp, float32 (n, out): the integer linear IntLinear runs (activation codes
    x the packed weight codes, exact int32 group sums, LoRA and bias in float), for zero points within the
    candidate's int32 bound (fused_safe).

        xb  float32 (n, C);  s float32 (C,);  sx, zx float32 (n,);  candidate: w4_candidate's;  qmax: 2^bits - 1
    """
    ops, _, group, rank = candidate
    s = s.contiguous()
    a, sa, lp = ops_avx512.encode(xb, s, sx, zx, qmax, group if "f_d" in ops else None,
                                  ops["f_Rt"] if rank else None)
    y = torch.empty_like(y_fp)
    ops_avx512.qgemm(a, ops["w_vnni4"], y.shape[1], group, ops["f_sw"], ops["f_cbd"], ops.get("f_d"), sa,
                     zx.to(torch.int32), sx, lp, rank, ops["f_Lt"], ops.get("f_bias"), y)
    return y.sub_(y_fp)


def bf16_pack(m):
    """m (C, W) float in the bf16 kernel's layout (the same bf16 values), or None where it does not run."""
    return ops_avx512.pack_bf16(m) if m.device.type == "cpu" and ops_avx512.bf16_ok() else None


def bf16_ref_losses(x2, step, width, m_packed, partner, split, s, ranges):
    """float64 (k,): per candidate, the sum over x2's rows of ||bf16(E_k) M (+ P)||^2 (+ 2 <E_k, partner> when
    split), E_k = fq(x2 / s_k) s_k - x2 with the quantizer's codes: the shared-weight path's evaluation for
    matmul_dtype bf16 (csrc/alpha_search_bf16.c), `step` rows per call. width: W."""
    x2 = x2.contiguous()
    rows = x2.shape[0]
    acc = torch.zeros(s.shape[0], dtype=torch.float64)
    for r0 in range(0, rows, step):
        acc += ops_avx512.ref_losses(x2[r0:r0 + step], r0, rows, width, m_packed, partner[r0:r0 + step], split, s,
                                     ranges)
    return acc

