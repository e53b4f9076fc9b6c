"""Loading a quantized checkpoint for sampling, and choosing its backend.

The scripts (sample_merge_TAS.py, sample.py) do three visible steps: `load_checkpoint`, then
quant.method.fold.fold_smoothing (the smoothing factors into adaLN and the V rows), then `to_backend`:

    fake  quantize-dequantize in float (every scheme; what calibration measured)
    int   real integer GEMMs (quant/nn/int_linear.py, one kernel per layer from quant/nn/backends.py: Triton on CUDA,
          the fused AVX512-VNNI kernel of quant/kernels/csrc/int_linear.c on x86 CPUs that have it, else
          torch._int_mm; W8A8 and packed W4A8)

`to_backend` moves the model to its device first, so the integer layers build their kernel's operands
once, where they run; `kernel_lines` says which kernel that is, and why.
"""
from collections import Counter

from quant.io import checkpoint
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


def to_backend(model, backend, device="cpu", kernel="auto", path=None):
    """The (folded) quantized model on `device` and `backend`, in eval mode (path: the checkpoint, named in errors).

    The model moves first, then (int) every QuantLinear becomes an IntLinear there, running `kernel`
    (quant.nn.int_linear.INT_KERNELS): its operands are built once, for the device they run on. A layer
    without an integer form, or a kernel that cannot run here, is a one-line UserError.
    """
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    model = model.to(device)
    if backend == "int":
        from quant.nn.int_linear import to_int_backend
        try:
            to_int_backend(model, kernel)
        except ValueError as e:
            forced = f" --int-kernel {kernel}" if kernel != "auto" else ""
            raise UserError(f"{path or 'the model'} on --backend int{forced}: {e}") from None
    return model.eval()


def kernel_lines(model, device, kernel="auto"):
    """What the model's integer layers run, for the user: one line naming the kernel(s), their layer counts
    and why; on CUDA one more when layers run on the torch-op fallback, which is slower than bf16. [] without
    integer layers."""
    from quant.nn.int_linear import IntLinear
    runs = Counter(m.runs for m in model.modules() if isinstance(m, IntLinear))
    if not runs:
        return []
    names = ", ".join(f"{name} ({n} layers)" for name, n in sorted(runs.items()))
    lines = [f"integer kernel on {device.type}: {names}; {_why(runs, device, kernel)}"]
    if device.type == "cuda" and "torch" in runs:
        lines.append("warning: the torch-op fallback of the integer layers is slower than bf16 on a GPU; "
                     "pip install triton for the Triton kernel (or sample with --backend fake)")
    return lines


def _why(runs, device, kernel):
    if kernel != "auto":
        return f"--int-kernel {kernel}"
    if device.type == "cuda":
        from quant.kernels import ops_triton
        return f"auto: {ops_triton.status()}" + ("" if "triton" in runs else ", so torch ops")
    from quant.kernels import ops_avx512
    if ops_avx512.status() != "ok":
        return f"auto: fused kernel unavailable ({ops_avx512.status()}), so torch ops"
    if "torch" in runs:
        return (f"auto: fused AVX512-VNNI kernel where in_features and the group size are multiples of "
                f"{ops_avx512.ALIGN_K} ({ops_avx512.ALIGN_K4} for packed 4-bit weights), else torch ops")
    return "auto: fused AVX512-VNNI kernel (x86 CPU)"
