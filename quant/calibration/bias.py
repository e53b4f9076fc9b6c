"""Bias correction (beyond the paper; docs/METHOD.md §15): each quantized layer's bias absorbs the mean of its
output error over the calibration loop.

A layer's output error E_t = Y_q,t - Y_fp,t (on the FP input X_t) splits into its mean over every calibration
step and row, mu (out,), and what varies around it. mu is a small part of the layer's squared error, but every
sample and token carries it in the same direction, through every later block and every denoising step, where
the varying part partly averages out. Lowering the bias by mu removes it exactly on the calibration loop: the
mean squared error over the loop drops by mean(mu^2), and the layer's arithmetic at inference is unchanged (one
bias vector; folded like any bias). mu comes from one FP loop after the search, each layer's FP input also run
through its chosen quantized layer; it is a mean, so it settles with few calibration samples (a channel maximum,
like TAS's a_j, does not).
"""
import torch

from quant.calibration.feed import ChunkedLoop, run_hooked


class MeanError:
    """Running float64 sum over rows of a layer's output error (out,) and the row count, on the error's device
    (no host sync per step)."""

    def __init__(self):
        self.total = None
        self.rows = 0

    def update(self, error):
        """error (..., out): Y_q - Y_fp of one step (or chunk)."""
        e = error.reshape(-1, error.shape[-1])
        s = e.sum(0, dtype=torch.float64)
        self.total = s if self.total is None else self.total.add_(s)
        self.rows += e.shape[0]
        return self

    @property
    def value(self):
        """float32 (out,): the mean error per output channel."""
        return (self.total / self.rows).float()


def mean_output_errors(fp_layers, quantized, loop):
    """{name: float32 (out,) mean over every step and row of quantized[name](X) - fp_layers[name](X)}.

    fp_layers: {name: nn.Linear} of the FP model that `loop` runs (a callable or ChunkedLoop: every chunk runs
    here); quantized: {name: module} taking the same input, e.g. the QuantLinear of the layer's chosen candidate,
    which QuantLinear.lower_bias then corrects."""
    errors = {name: MeanError() for name in fp_layers}
    run_hooked(fp_layers, lambda name, x, y: errors[name].update(quantized[name](x) - y), ChunkedLoop.of(loop),
               outputs=True)
    return {name: e.value for name, e in errors.items()}

