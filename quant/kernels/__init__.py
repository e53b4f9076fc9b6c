"""Kernel wrappers (torch ops, AVX512 C, Triton) and their compiled sources (csrc/).

The layers (quant/nn) hold their kernels' wrappers (ops_torch, ops_avx512, ops_triton). Method code (quant/method,
quant/search, quant/calibration) reaches a kernel only through the names below (quant/kernels/search_ops.py: the
alpha search's fused loss evaluations, the LoRA loop's quantize-and-residual step), each falling back to torch
where `available()` (or `bf16_ok()`) says the library does not run.
"""
from quant.kernels.search_ops import (available, bf16_ok, bf16_pack, bf16_ref_losses, fused_safe, quant_residual,
                                      rowrange, w4_candidate, w4_fits, w4_residual)

__all__ = ["available", "bf16_ok", "bf16_pack", "bf16_ref_losses", "fused_safe", "quant_residual", "rowrange",
           "w4_candidate", "w4_fits", "w4_residual"]
