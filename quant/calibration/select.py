"""Smoothing select (beyond the paper; docs/METHOD.md §16): calibrate a few smoothing options in turn and keep the
one whose quantized model ends the calibration loop nearest the FP model's samples.

Why: on the bundled model a W4 checkpoint's quality depends on its exact rounding. Smoothing factors from another
calibration draw, or the same ones jittered by 1 %, change every weight's rounding and move the PSNR against FP by
+-1.5 dB (bench/results/rounding_lottery.md); no per-layer error sees which rounding the trajectory favours. The
whole sampling loop does: the quantized calibration loop's end-to-end error ranks checkpoints much as 200 fresh
samples do (bench/results/select_proxy.md). An option that does not depend on the draw at all (no smoothing, "none")
bounds how badly a draw can go; TAS is kept where it ends nearer FP, which is where activation outliers make it pay.

The criterion is the mean over the calibration samples of 10 log10(4 / MSE_i) between the quantized and the FP
final samples (the PSNR of data in [-1, 1]; for latents only the ranking matters): a mean of logs, so one
diverging sample does not decide.
"""
from contextlib import contextmanager

import torch

PEAK = 4.0  # (max - min)^2 of data in [-1, 1]


def as_samples(out):
    """[float32 (n, C, H, W) per chunk] from what one run of a calibration loop returned (ValueError for None)."""
    if out is None:
        raise ValueError("smoothing select compares the calibration loop's final samples: the loop must return "
                         "them (quant.fp_calibration_loop does)")
    return [x.detach().float() for x in out]


@torch.no_grad()
def final_samples(loop):
    """as_samples of one run of `loop` (a ChunkedLoop whose run returns its final samples, as
    quant.fp_calibration_loop's does)."""
    return as_samples(loop())


@contextmanager
def swapped(model, modules):
    """model with modules ({name: module}) in place of its own for the duration; the originals restored after."""
    original = {name: model.get_submodule(name) for name in modules}
    try:
        for name, m in modules.items():
            model.set_submodule(name, m)
        yield model
    finally:
        for name, m in original.items():
            model.set_submodule(name, m)


def end_to_end_psnr(samples, reference):
    """Mean over samples of 10 log10(PEAK / MSE_i) between two lists of (n, ...) chunks (a float; one host sync)."""
    mse = torch.cat([(a - b).pow(2).flatten(1).mean(1) for a, b in zip(samples, reference)])
    return float((10 * torch.log10(PEAK / mse.clamp(min=1e-20))).mean())


def option_label(cfg):
    """'none' or 'alpha 0.5': one option of smoothing select (a QuantConfig of QuantConfig.options())."""
    return "none" if cfg.smoothing == "none" else f"alpha {cfg.alpha:g}"
