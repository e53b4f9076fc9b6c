"""Layer-wise alpha grid search, streaming over calibration steps (METHOD.md sections 4, 8).

For every candidate alpha the fully quantized layer is prepared once; each
calibration step then adds mean((Y_q(alpha) - Y_fp)^2) to a running sum, so no
activation history is kept. All candidates are evaluated with one batched
product over the stacked (n_alpha, out, in) weights.

Schemes (METHOD.md section 8):
* ditas: s from w_j = max|W[:, j]|; W diag(s) is re-quantized with the LoRA loop
  for every alpha; Y = fq(X/s) (Q + L R)^T + b.
* reference: W (unsmoothed) is quantized with the LoRA loop once; w_j = max|Q[:, j]|;
  the layer is Q diag(s) with branch L (R diag(s)), i.e.
  Y = (fq(X/s) * s) (Q + L R)^T + b; only the activation error depends on alpha.

A candidate alpha of None means "no smoothing" (s = 1).
"""
from dataclasses import dataclass
from functools import partial

import torch

from quant.lora import LoraFit, fit_lora
from quant.quantizer import QWeight, fake_quantize_act, quantize_weight, scale_qweight_columns
from quant.smoothing import smoothing_factors, weight_channel_absmax


def alpha_grid(step=0.05):
    """[0, step, ..., 1] with exact decimals (21 values for 0.05)."""
    n = round(1 / step)
    if n < 1 or abs(n * step - 1) > 1e-9:
        raise ValueError(f"alpha step must divide 1, got {step}")
    return [round(k * step, 10) for k in range(n + 1)]


def select_alpha(losses, alphas):
    """Index of the smallest loss; ties go to the smaller alpha (None, no smoothing, counts as smallest)."""
    return min(range(len(alphas)), key=lambda k: (losses[k], -1.0 if alphas[k] is None else alphas[k]))


@dataclass
class LayerQuant:
    """Everything needed to build the quantized layer for one alpha.

    The layer computes y = fq(x / smooth) (dequant(qweight) + lora_L lora_R)^T + bias,
    with qweight and lora_R in the smoothed domain (reference: Q(W) with column
    scales times s, and R diag(s)). smooth is None without smoothing.
    weight_error_rtn / weight_error_lora: ||W' - Q(W')||_F and ||W' - Q - L R||_F of
    the weight W' that was quantized (ditas: W diag(s); reference: W).
    lora_errors: the LoRA loop's error after each iteration.
    """
    alpha: float | None
    smooth: torch.Tensor | None
    qweight: QWeight
    lora_L: torch.Tensor
    lora_R: torch.Tensor
    bias: torch.Tensor | None
    weight_error_rtn: float
    weight_error_lora: float
    lora_errors: list


def _chunks(n, size):
    size = n if size is None else size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class AlphaSearch:
    """Streaming grid search of alpha for one linear layer.

    weight (out, in), bias (out,) or None; act_absmax: the TAS statistic a_j (in,),
    unused when every alpha is None. act_cfg None leaves activations unquantized.
    scheme defaults to weight_cfg.scheme. max_steps: updates after that many are
    ignored (reference: 50). chunk: candidates processed together (bounds memory).
    """

    def __init__(self, weight, bias, act_absmax, alphas, weight_cfg, act_cfg, lora_rank=32, lora_iters=10,
                 scheme=None, max_steps=None, svd="full", chunk=None):
        self.alphas = list(alphas)
        if not self.alphas:
            raise ValueError("AlphaSearch needs at least one candidate alpha")
        self.scheme = weight_cfg.scheme if scheme is None else scheme
        if self.scheme not in ("ditas", "reference"):
            raise ValueError(f"scheme must be 'ditas' or 'reference', got {self.scheme!r}")
        self.weight = weight.detach().float()
        self.bias = None if bias is None else bias.detach()
        self.act_cfg, self.max_steps, self.chunk = act_cfg, max_steps, chunk
        self.steps = 0
        self._loss = torch.zeros(len(self.alphas), dtype=torch.float64, device=self.weight.device)
        quantize_fn = partial(quantize_weight, cfg=weight_cfg)
        fit = partial(fit_lora, quantize_fn=quantize_fn, rank=lora_rank, iters=lora_iters, svd=svd)
        if self.scheme == "reference":
            self._fit = fit(self.weight)
            self._smooth = self._factors(act_absmax, weight_channel_absmax(self._fit.q))
            self._weff = self._fit.effective
        else:
            self._smooth = self._factors(act_absmax, weight_channel_absmax(self.weight))
            fits = [fit(self.weight * self._smooth[sl, None, :]) for sl in _chunks(len(self.alphas), chunk)]
            self._fit = LoraFit.cat(fits)
            self._weff = self._fit.effective

    def _factors(self, act_absmax, w_absmax):
        """(n_alpha, in) smoothing factors, rows of ones for alpha None."""
        s = torch.ones(len(self.alphas), self.weight.shape[1], device=self.weight.device)
        for k, a in enumerate(self.alphas):
            if a is not None:
                s[k] = smoothing_factors(act_absmax.to(s.device), w_absmax, a)
        return s

    @torch.no_grad()
    def update(self, x):
        """Add one calibration step's loss for every alpha; x (..., in) is the full-precision input."""
        if self.max_steps is not None and self.steps >= self.max_steps:
            return
        x = x.detach().to(self.weight.device, torch.float32)
        y_fp = x.reshape(-1, x.shape[-1]) @ self.weight.T  # bias cancels in Y_q - Y_fp
        for sl in _chunks(len(self.alphas), self.chunk):
            s = self._smooth[sl]
            xs = x.unsqueeze(0) / s.view(s.shape[0], *[1] * (x.dim() - 1), s.shape[1])
            xq = xs if self.act_cfg is None else fake_quantize_act(xs, self.act_cfg, stack_dims=1)
            xq = xq.reshape(s.shape[0], -1, x.shape[-1])
            if self.scheme == "reference":
                y = (xq * s.unsqueeze(1)) @ self._weff.T
            else:
                y = torch.bmm(xq, self._weff[sl].transpose(1, 2))
            self._loss[sl] += (y - y_fp).pow(2).mean(dim=(1, 2)).double()
        self.steps += 1

    @property
    def losses(self):
        return self._loss.tolist()

    def result(self):
        """(best alpha, losses per alpha)."""
        if self.steps == 0:
            raise RuntimeError("AlphaSearch.result() before any update()")
        losses = self.losses
        return self.alphas[select_alpha(losses, self.alphas)], losses

    def best(self):
        """LayerQuant of the best alpha."""
        return self.candidate(self.alphas.index(self.result()[0]))

    def candidate(self, k):
        """LayerQuant of candidate k (no update needed, e.g. for a fixed alpha)."""
        alpha, s = self.alphas[k], self._smooth[k]
        f = self._fit if self.scheme == "reference" else self._fit[k]
        qweight, R = f.qweight, f.R
        if self.scheme == "reference" and alpha is not None:
            qweight, R = scale_qweight_columns(qweight, s), R * s
        # clones: the returned layer must not keep the whole candidate stack alive
        return LayerQuant(alpha=alpha, smooth=None if alpha is None else s.clone(), qweight=qweight.clone(),
                          lora_L=f.L.clone(), lora_R=R.clone(), bias=self.bias,
                          weight_error_rtn=float(f.rtn_error), weight_error_lora=float(f.errors[-1]),
                          lora_errors=f.errors.tolist())

