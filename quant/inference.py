"""Load a quantized checkpoint ready to sample: fold the smoothing factors, pick the backend.

    fake  quantize-dequantize in float (every scheme; what calibration measured)
    int   real integer GEMMs (quant/int_linear.py: the fused AVX512-VNNI kernel of quant/csrc/int_linear.c on
          x86 CPUs that have it, else torch._int_mm; W8A8 and packed W4A8)
"""
from cli import UserError
from quant.checkpoint import load_quantized
from quant.fold import fold_smoothing

BACKENDS = ("fake", "int")


def load_for_sampling(path, backend="fake", device="cpu"):
    """(model, meta): the quantized DiT from `path`, folded, on `backend`, in eval mode."""
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    model, meta = load_quantized(path, device="cpu")
    fold_smoothing(model)
    if backend == "int":
        from quant.int_linear import to_int_backend
        try:
            to_int_backend(model)
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None
    return model.to(device).eval(), meta
