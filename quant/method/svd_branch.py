"""A 16-bit low-rank branch taken out of the smoothed weight BEFORE quantization (SVDQuant's order;
beyond the paper, `--lora-order svd_first`).

Today's LoRA branch (quant/method/lora.py, `--lora-order residual`) fits the quantization residual: Q is the
quantized W_s = W diag(s), L R approximates W_s - Q by the alternating loop, and the branch is fed the
QUANTIZED activation:

    residual:   y = fq(x/s) Q^T + (fq(x/s) R^T) L^T + b,   L R ~ W_s - Q

SVDQuant (Li et al., 2024) takes the top-r singular directions of the smoothed weight out first and
quantizes only what is left; the branch then runs in 16-bit on the smoothed, UNQUANTIZED activation,
so it carries the weight's largest directions without the activation rounding error:

    svd_first:  L R = SVD_r(W_s) (sqrt(S) on both sides),  Q = quantize(W_s - L R)
                y = fq(x/s) Q^T + ((x/s) R^T) L^T + b

The stored state is the same (codes, scales, zero points, L, R); a layer records which input feeds its
branch (`lora_input`: "quantized" or "smoothed", LORA_INPUTS). The integer backend runs Q on the integer
kernel with no LoRA and adds the branch in float on x/s (quant/nn/int_linear.py).
"""
import math

import torch

from quant.method.lora import LoraFit, fit_lora, low_rank_factors, quantize_residual
from quant.method.quantizer import dequantize_weight
from quant.quant_config import LORA_ORDERS

POWER_STEPS = 4  # randomized SVD: one fit per alpha, nothing to warm-start from, so more steps than quant/method/lora.py's


def lora_input_of(lora_order):
    """The activation that feeds a branch fitted in `lora_order`: quantized (residual) or smoothed (svd_first)."""
    if lora_order not in LORA_ORDERS:
        raise ValueError(f"lora order must be one of {LORA_ORDERS}, got {lora_order!r}")
    return "quantized" if lora_order == "residual" else "smoothed"


def top_singular(w, rank, svd="full"):
    """(L (..., out, r), R (..., r, in)): the best rank-r approximation L R of w, sqrt(S) on both sides.
    svd "full": LAPACK's; "lowrank" or "subspace": a seeded randomized SVD (POWER_STEPS power steps, basis width
    rank + OVERSAMPLE; one factorisation has no neighbour to warm-start from). At DiT-XL/2's fc1 (4608 x 1152) the
    full SVD takes ~8 s on one CPU core, the randomized one ~0.3 s, with ||w - L R||_F within ~1e-4 of the optimum
    on a flat-spectrum test weight (tests/test_w4a4.py)."""
    return low_rank_factors(w, rank, "full" if svd == "full" else "lowrank", niter=POWER_STEPS)


def fit_svd_first(w, quantize_fn, rank=32, svd="full"):
    """SVDQuant's order for a weight w (..., out, in): L R = SVD_r(w), Q = quantize(w - L R).

    Returns a LoraFit: q, qweight (Q), L, R; errors: one entry, ||w - Q - L R||_F; rtn_error: ||w - quantize(w)||_F
    (plain round-to-nearest, for the report). rank 0 is round-to-nearest."""
    if rank == 0:  # plain round-to-nearest, as fit_lora's
        return fit_lora(w, quantize_fn, rank=0, iters=1)
    w = w.detach()
    w = w if w.dtype in (torch.float32, torch.float64) else w.float()
    out, inp = w.shape[-2:]
    if not 0 <= rank <= min(out, inp):
        raise ValueError(f"LoRA rank must be in 0..min(out, in) = {min(out, inp)}, got {rank}")
    rtn_error = torch.linalg.matrix_norm(quantize_residual(w, None, quantize_fn)[1])
    L, R = top_singular(w, rank, svd)
    lr = (L @ R).contiguous()
    qweight, e = quantize_residual(w, lr, quantize_fn)  # e = w - dequant(Q); Q quantizes w - L R
    return LoraFit(dequantize_weight(qweight).to(w.dtype), qweight, L, R, torch.linalg.matrix_norm(e - lr)[None],
                   rtn_error, math.prod(w.shape[:-2]), None)


def branch(x, L, R):
    """The branch's output (x R^T) L^T for x (..., in): two thin products, float32 (x's dtype kept)."""
    return torch.nn.functional.linear(torch.nn.functional.linear(x, R.to(x.dtype)), L.to(x.dtype))
