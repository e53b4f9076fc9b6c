"""Approximate alpha search from one calibration pass (beyond the paper; `--search approx`).

The exact search (quant/search.py, quant/search_losses.py) needs a second FP sampling loop in which every
layer runs all 21 candidate quantized layers on every step's input. Here the
per-alpha loss is predicted from statistics of the single TAS pass (pass 1):

    L(alpha) = sum_t mean((Y_q,t - Y_fp,t)^2)

With W_s the effective weight the layer applies to X/s (ditas: Q_s + L_s R_s, the
quantized smoothed weight with its LoRA branch; reference: (Q + L R) diag(s)), and
fq(X/s) = X/s + E_t (E_t the activation rounding error),

    Y_q,t - Y_fp,t = X_t D^T + E_t W_s^T,     D = W_s diag(1/s) - W

(D is the quantization error of the weight mapped back to the unsmoothed domain).
Treating E_t as zero-mean uniform noise, independent of X_t, of variance
Delta_t(alpha)^2 / 12 per element (Delta_t: the activation quantizer's step on
X_t/s), the cross term vanishes in expectation and

    L(alpha) ~ sum_t [ tr(D M_t D^T) / (n_t out)  +  (Delta_t^2 / 12) ||W_s||_F^2 / out ]

with M_t = X_t^T X_t and n_t rows. The first (weight) term is exact; we keep
M = sum_t M_t (C x C per layer) and divide by the per-step row count n (constant in
calibration: batch x tokens; if it varied, n would be the mean row count, which
weights steps by their size). The second (activation) term needs, per step,
mean over rows of Delta^2, from statistics that do not depend on alpha:

* tensor: one range for the whole X_t/s. Since s > 0, max(X_t/s) =
  max_j cmax_t[j] / s_j and min likewise, with the per-step per-channel min/max
  cmax_t, cmin_t (C each): Delta_t is exact.
* row: one range per batch row (x[b] over its tokens); keeping per-step
  per-row per-channel min/max (B x C) makes every Delta_{t,b} exact.
* token: one range per token. Exact ranges would need the whole X_t, so a fixed
  subsample of `token_samples` tokens per step (evenly spaced over the flattened
  rows) is kept and mean(Delta^2) is estimated on it (an unbiased estimate of the
  mean over all tokens; memory steps x token_samples x C).

What is approximated: the rounding error is modelled as uniform, independent of X
and between elements, and the token estimate is a subsample. One systematic effect
is modelled: the reference scheme's 2^A-step scale puts each range's maximum on a
clamped code, one element per range with an error of about a whole step (see
noise_variance; it matters for per-token ranges, ~12/C relative). The model breaks
down when tokens are nearly identical (rounding errors then correlate with X): on a
near-init checkpoint it chose other alphas than the exact search in most layers.
With activation quantization off the approximation is exact.

One FP sampling loop in total: pass 1 collects the TAS maxima and these
statistics; candidates (with their LoRA fits) are prepared as in the exact search;
losses are evaluated from the statistics.
"""
import torch

from quant.quantizer import num_intervals
from quant.search import Scores
from quant.smoothing import channel_absmax

DEFAULT_TOKEN_SAMPLES = 64


class StepStack:
    """Per-step tensors of one shape, appended into one buffer that doubles when full: a few large
    allocations instead of one small long-lived tensor per step and layer, which fragments glibc's
    heap between the FP loop's large transient activations (measured on DiT-S/2, 20 steps: 5.3 GB
    RSS for ~0.2 GB of statistics). Reads as a sequence of the appended tensors (views); a tensor of
    another shape is kept on its own."""

    def __init__(self):
        self._buf, self._n, self._other = None, 0, []

    def append(self, t):
        if self._other or (self._buf is not None and t.shape != self._buf.shape[1:]):
            self._other.append(t)
            return
        if self._buf is None or self._n == self._buf.shape[0]:
            grown = t.new_empty((max(8, 2 * self._n),) + tuple(t.shape))
            if self._n:
                grown[:self._n] = self._buf[:self._n]
            self._buf = grown
        self._buf[self._n] = t
        self._n += 1

    def _items(self):
        return ([] if self._buf is None else list(self._buf[:self._n])) + self._other

    def __len__(self):
        return self._n + len(self._other)

    def __iter__(self):
        return iter(self._items())

    def __getitem__(self, k):
        return self._items()[k]


class InputStats:
    """Everything the approximate search needs from one layer's inputs, accumulated step by step.

    absmax: the TAS statistic a_j over all steps (like RunningAbsMax).
    Over the first `max_steps` steps (all if None):
      xtx: sum_t X_t^T X_t (C x C, float64); rows: n_t per step;
      tensor: cmin/cmax (steps, C); row: (steps, B, C); token: tokens (steps, K, C).
    granularity None keeps only absmax and xtx (activation quantization off).
    """

    def __init__(self, granularity="tensor", max_steps=None, token_samples=DEFAULT_TOKEN_SAMPLES,
                 dtype=torch.float64):
        if granularity not in (None, "tensor", "row", "token"):
            raise ValueError(f"granularity must be tensor, row, token or None, got {granularity!r}")
        self.granularity, self.max_steps, self.token_samples, self.dtype = granularity, max_steps, token_samples, dtype
        self.absmax = None
        self.xtx = None
        self.rows = []
        self.cmin, self.cmax, self.tokens = StepStack(), StepStack(), StepStack()
        self.seen = 0  # all updates (TAS); len(self.rows) counts the ones in the loss
        self._xtx_bytes = 0  # X^T X's bytes once release()d

    @property
    def value(self):
        """The TAS statistic a_j, as RunningAbsMax.value."""
        return self.absmax

    def nbytes(self):
        """Bytes of a_j and X^T X (while held, or as held before release())."""
        held = self._xtx_bytes if self.xtx is None else self.xtx.numel() * self.xtx.element_size()
        return held + (0 if self.absmax is None else self.absmax.numel() * self.absmax.element_size())

    def release(self):
        """Drop everything but a_j (the shortlist, once the layer's candidates are ranked)."""
        if self.xtx is not None:
            self._xtx_bytes = self.xtx.numel() * self.xtx.element_size()
        self.xtx, self.cmin, self.cmax, self.tokens = None, StepStack(), StepStack(), StepStack()

    @property
    def steps(self):
        return len(self.rows)

    @torch.no_grad()
    def update(self, x):
        x = x.detach()
        m = channel_absmax(x)
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        self.seen += 1
        if self.max_steps is not None and self.steps >= self.max_steps:
            return self
        c = x.shape[-1]
        flat = x.reshape(-1, c)
        xd = flat.to(self.dtype)
        self.xtx = xd.T @ xd if self.xtx is None else self.xtx.addmm_(xd.T, xd)
        self.rows.append(flat.shape[0])
        g = self.granularity
        if g == "tensor":
            self.cmin.append(flat.amin(0).float())
            self.cmax.append(flat.amax(0).float())
        elif g == "row":
            per_row = x.reshape(x.shape[0], -1, c) if x.dim() >= 2 else x.reshape(1, 1, c)
            self.cmin.append(per_row.amin(1).float())
            self.cmax.append(per_row.amax(1).float())
        elif g == "token":
            k = min(self.token_samples, flat.shape[0])
            idx = torch.linspace(0, flat.shape[0] - 1, k, device=flat.device).round().long()
            self.tokens.append(flat[idx].float())
        return self

    @classmethod
    def merge(cls, parts):
        """The statistics of every part's inputs (parts: chunks of the same steps, in chunk order): X^T X
        summed in that order, the per-update entries (rows, ranges) one part after the other. Each
        chunk's step stays one update (the approximate loss is a mean per update, as the search's)."""
        first = parts[0]
        out = cls(first.granularity, first.max_steps, first.token_samples, first.dtype)
        for p in parts:
            out.absmax = p.absmax if out.absmax is None else torch.maximum(out.absmax, p.absmax)
            if p.xtx is not None:
                out.xtx = p.xtx.clone() if out.xtx is None else out.xtx.add_(p.xtx)
            out.rows += p.rows
            out.seen += p.seen
            for stack in ("cmin", "cmax", "tokens"):
                for t in getattr(p, stack):
                    getattr(out, stack).append(t)
        return out

    def mean_rows(self):
        return sum(self.rows) / max(len(self.rows), 1)


def _interval_width(lo, hi, act_cfg):
    """The activation quantizer's step for a range (affine_params: a constant range gets no error)."""
    return (hi - lo) / num_intervals(act_cfg.bits, act_cfg.scheme)


@torch.no_grad()
def noise_variance(stats, smooth, act_cfg, colnorm2=None, step_chunk=16):
    """The activation term's ingredients per candidate, summed over steps: (uniform, clamped), (A,) float64.

    uniform: mean over rows of Delta_t^2 / 12 (multiply by ||W_s||_F^2 / out for the loss).
    clamped: the reference scheme only (zeros otherwise; needs colnorm2 (A, C) = squared column
    norms of W_s): its scale (max - min) / 2^A puts each range's maximum on code 2^A, clamped to
    2^A - 1, an error of (1 + u) Delta (u uniform in +-1/2, from the integer zero point) instead of
    u Delta. That one element per range, in the channel j* holding the maximum of x/s, adds
    E((1 + u)^2 - u^2) Delta^2 ||W_s[:, j*]||^2 = Delta^2 ||W_s[:, j*]||^2 to its row's squared
    output error; `clamped` is that averaged over all rows (divide by out for the loss). Negligible
    per tensor or row; per token it is about 12/C relative, more where the maximum sits in an
    outlier channel whose W_s column smoothing has inflated.
    smooth: (A, C) smoothing factors (ones for no smoothing).
    """
    A = smooth.shape[0]
    uniform = torch.zeros(A, dtype=torch.float64, device=smooth.device)
    clamped = torch.zeros_like(uniform)
    if act_cfg is None or stats.steps == 0:
        return uniform, clamped
    inv = (1.0 / smooth.float())
    g = stats.granularity
    if g != act_cfg.granularity:
        raise ValueError(f"statistics were gathered for granularity {g}, the quantizer uses {act_cfg.granularity}")
    clip = act_cfg.scheme == "reference" and colnorm2 is not None
    if g == "token":
        data = [(t,) for t in stats.tokens]
        rows_per_range = [1] * len(data)
    else:
        data = list(zip(stats.cmin, stats.cmax))
        rows_per_range = [n / lo.shape[0] if g == "row" else n for n, (lo, _) in zip(stats.rows, data)]
    for i in range(0, len(data), step_chunk):
        part = data[i:i + step_chunk]
        m = torch.tensor(rows_per_range[i:i + step_chunk], dtype=torch.float64, device=uniform.device)  # (T,)
        if g == "token":
            x = torch.stack([p[0] for p in part]).to(inv.device)            # (T, K, C)
            xs = x.unsqueeze(0) * inv[:, None, None, :]                     # (A, T, K, C)
            hi_s, top = xs.max(-1)                                          # (A, T, K)
            delta = _interval_width(xs.amin(-1), hi_s, act_cfg)
        else:
            lo = torch.stack([p[0] for p in part]).to(inv.device)           # (T, C) or (T, B, C)
            hi = torch.stack([p[1] for p in part]).to(inv.device)
            shape = (A,) + (1,) * (lo.dim() - 1) + (lo.shape[-1],)
            # s > 0: min/max of x/s over a range are min/max over channels of cmin/s, cmax/s
            hi_s, top = (hi.unsqueeze(0) * inv.view(shape)).max(-1)         # (A, T) or (A, T, B)
            delta = _interval_width((lo.unsqueeze(0) * inv.view(shape)).amin(-1), hi_s, act_cfg)
        d2 = delta.double().pow(2)
        if d2.dim() == 2:
            d2, top = d2.unsqueeze(-1), top.unsqueeze(-1)                   # one range per step
        uniform += (d2.mean(-1) / 12).sum(-1)  # every row's ranges have m rows: the row mean is the range mean
        if clip:
            col = torch.gather(colnorm2.to(d2).unsqueeze(1).expand(-1, top.shape[1], -1), 2,
                               top.reshape(A, top.shape[1], -1)).reshape(top.shape)
            # one clamped element per range, i.e. per m rows
            clamped += ((d2 * col).mean(-1) / m).sum(-1)
    return uniform, clamped


@torch.no_grad()
def approx_losses(candidates, stats, act_cfg):
    """Predicted loss sum_t mean((Y_q - Y_fp)^2) of every candidate (quant.search.Candidates) from one
    layer's InputStats: returns (total, weight_term, noise_term) as lists of floats. One candidate's
    dense weight at a time."""
    weight = candidates.weight
    out = weight.shape[0]
    n = stats.mean_rows()
    m = stats.xtx.to(weight.device)
    weight_terms, noise_terms = [], []
    for k in range(len(candidates.alphas)):
        s, ws = candidates.smooth[k:k + 1], candidates.smoothed_weight(k).unsqueeze(0)
        d = (ws / s[:, None, :] - weight).to(m.dtype)                         # (1, out, in)
        weight_terms.append(((d @ m) * d).sum(dim=(1, 2)) / (n * out))
        ws2 = ws.double().pow(2)
        uniform, clamped = noise_variance(stats, s, act_cfg, colnorm2=ws2.sum(1))
        noise_terms.append((uniform.to(ws2.device) * ws2.sum(dim=(1, 2)) + clamped.to(ws2.device)) / out)
    wt, nt = torch.cat(weight_terms), torch.cat(noise_terms)
    return (wt + nt).tolist(), wt.tolist(), nt.tolist()


class ApproxScoring:
    """The approximate search as the calibration driver's scoring phase (quant/calibrate.py): pass 1
    gathers InputStats (the TAS maxima among them), the losses are predicted from them; one FP loop.

    Its report adds each alpha's weight and activation terms (search_losses_weight_term / _act_term);
    output_error and output_error_rtn are the predicted per-step losses.
    """
    group_statistics, scoring_loop = True, False

    def __init__(self, cfg, token_samples=DEFAULT_TOKEN_SAMPLES):
        self.cfg, self.token_samples = cfg, token_samples

    def statistic(self):
        return InputStats(self.cfg.act_cfg().granularity, max_steps=self.cfg.search_steps,
                          token_samples=self.token_samples)

    def prune(self, name, candidates, statistic):
        return candidates

    def score(self, layers, candidates, baselines, stats, loop):
        """{name: Scores} predicted from pass 1's statistics (no FP loop)."""
        acfg, out = self.cfg.act_cfg(), {}
        for name, cands in candidates.items():
            st = stats[name]
            losses, wterm, nterm = approx_losses(cands, st, acfg)
            rtn = approx_losses(baselines[name], st, acfg)[0][0]
            out[name] = Scores(losses, st.steps, rtn, st.steps,
                               {"search_losses_weight_term": wterm, "search_losses_act_term": nterm})
        return out
