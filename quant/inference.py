"""Loading a quantized checkpoint for sampling, and choosing its backend.

The scripts (sample_merge_TAS.py, sample.py) do three visible steps: `load_checkpoint`, then
quant.fold.fold_smoothing (the smoothing factors into adaLN and the V rows), then `to_backend`:

    fake  quantize-dequantize in float (every scheme; what calibration measured)
    int   real integer GEMMs (quant/int_linear.py: the fused AVX512-VNNI kernel of quant/csrc/int_linear.c
          on x86 CPUs that have it, else torch._int_mm; W8A8 and packed W4A8)
"""
from quant import checkpoint
from quant.errors import UserError

BACKENDS = ("fake", "int")


def load_checkpoint(path):
    """(model on CPU in eval mode, meta) of a quantized checkpoint; any failure is a one-line UserError."""
    try:
        return checkpoint.load_quantized(path, device="cpu")
    except UserError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"cannot load the quantized checkpoint {path} ({type(e).__name__}: {first})") from None


def to_backend(model, backend, path):
    """The (folded) quantized model on `backend`, in eval mode."""
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "int":
        from quant.int_linear import to_int_backend
        try:
            to_int_backend(model)
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None
    return model.eval()
