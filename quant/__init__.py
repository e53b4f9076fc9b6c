"""DiTAS post-training quantization of Diffusion Transformers: the public API.

    import quant
    cfg = quant.QuantConfig(weight_bit=4, act_bit=8)                 # the one place defaults live
    loop = quant.fp_calibration_loop(model, labels, steps=100)        # the FP model's own trajectories (data-free)
    report = quant.quantize_dit(model, cfg, loop)                     # TAS, alpha search, LoRA: QuantLinear in place
    quant.save_quantized(model, meta, report, "out/")                 # packed codes; quant.load_quantized reads it
    quant.fold_smoothing(model)                                       # smoothing into adaLN and the V rows
    quant.to_backend(model, "int", device)                            # integer GEMMs (Triton, AVX512 C, torch ops)

Where each part lives: docs/ARCHITECTURE.md.
"""
import importlib

# name -> the module that defines it; imported on first use, so `import quant` (and quant.errors, quant.quant_config)
# stays light: QuantConfig needs no torch, and diffusion/ can raise quant.errors.UserError without a cycle
_API = {
    "QuantConfig": "quant.quant_config",
    "fp_calibration_loop": "quant.calibration.loop",
    "quantize_dit": "quant.calibration.driver",
    "save_quantized": "quant.io.checkpoint",
    "load_quantized": "quant.io.checkpoint",
    "load_checkpoint": "quant.nn.inference",
    "fold_smoothing": "quant.method.fold",
    "to_backend": "quant.nn.inference",
    "UserError": "quant.errors",
}
__all__ = list(_API)


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'quant' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)


def __dir__():
    return sorted(set(globals()) | set(__all__))
