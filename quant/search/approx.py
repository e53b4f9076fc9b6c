"""Approximate alpha search from one calibration pass (beyond the paper; `--search approx`).

The exact search (quant/search/candidates.py, quant/search/losses.py) needs a second FP sampling loop in which every
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

from quant.method.quantizer import num_intervals
from quant.method.smoothing import channel_absmax

DEFAULT_TOKEN_SAMPLES = 64
STEP_BLOCK = 16  # steps per block of a StepStack, and per pass of noise_variance


class StepStack:
    """Per-step tensors, appended into blocks of STEP_BLOCK steps held in host memory: a few large
    allocations instead of one small long-lived tensor per step and layer (which fragmented glibc's heap
    between the FP loop's large transient activations: 5.3 GB RSS for ~0.2 GB of statistics on DiT-S/2,
    20 steps), and no device memory growing with the steps. A CUDA tensor is copied into a pinned block
    with a non-blocking copy, so appending never waits for the device; a read on the host waits for it
    once (torch.cuda.synchronize), blocks(device) on a CUDA device not at all (stream-ordered copies).
    A tensor of another shape than the last starts a new block. Reads as the sequence of the appended
    tensors (views)."""

    def __init__(self):
        self._blocks, self._pending = [], None  # [[block, filled]]; the device whose copies may still run

    def append(self, t):
        last = self._blocks[-1] if self._blocks else None
        if last is None or last[1] == last[0].shape[0] or last[0].shape[1:] != t.shape:
            pin = t.is_cuda or (torch.cuda.is_initialized() and t.is_pinned())  # (no CUDA context for a CPU run)
            last = [torch.empty((STEP_BLOCK,) + tuple(t.shape), dtype=t.dtype, pin_memory=pin), 0]
            self._blocks.append(last)
        last[0][last[1]].copy_(t, non_blocking=t.is_cuda)
        last[1] += 1
        if t.is_cuda:
            self._pending = t.device

    def _settle(self):
        """Wait for the copies still running into the blocks (before the host reads them)."""
        if self._pending is not None:
            torch.cuda.synchronize(self._pending)
            self._pending = None

    def blocks(self, device=None):
        """The filled part of every block, (n, *shape) each, in order; on `device` (None: where they are)."""
        if device is None or torch.device(device).type != "cuda":
            self._settle()
        return [b[:n].to(device or b.device, non_blocking=True) for b, n in self._blocks]

    def nbytes(self):
        """Host bytes of the blocks (filled or not)."""
        return sum(b.numel() * b.element_size() for b, _ in self._blocks)

    def __len__(self):
        return sum(n for _, n in self._blocks)

    def __iter__(self):
        return (t for block in self.blocks() for t in block)

    def __getitem__(self, k):
        return list(self)[k]

    def __getstate__(self):  # pickled for another process (quant/calibration/wire.py): the filled steps, read on the host
        self._settle()
        return {"_blocks": [[b[:n], n] for b, n in self._blocks], "_pending": None}

    def __setstate__(self, state):  # arrived on a CUDA device (wire's nccl): back to pinned host blocks
        self.__dict__.update(state)
        for b in self._blocks:
            if b[0].is_cuda:
                b[0] = b[0].cpu().pin_memory()


class InputStats:
    """Everything the approximate search needs from one layer's inputs, accumulated step by step.

    absmax: the TAS statistic a_j over all steps (like RunningAbsMax).
    Over the first `max_steps` steps (all if None):
      xtx: sum_t X_t^T X_t (C x C, float64); rows: n_t per step;
      tensor: cmin/cmax (steps, C); row: (steps, B, C); token: tokens (steps, K, C), float32 StepStacks
      in host memory (pinned when x is on a CUDA device: they do not grow the device's memory).
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
        self._held = (0, 0)  # X^T X's and the ranges' bytes once release()d

    @property
    def value(self):
        """The TAS statistic a_j, as RunningAbsMax.value."""
        return self.absmax

    def range_nbytes(self):
        """Host bytes of the per-step ranges (while held, or as held before release())."""
        return self._held[1] if self.xtx is None else sum(s.nbytes() for s in (self.cmin, self.cmax, self.tokens))

    def nbytes(self):
        """Bytes of a_j, X^T X and the per-step ranges (while held, or as held before release())."""
        held = self._held[0] if self.xtx is None else self.xtx.numel() * self.xtx.element_size()
        absmax = 0 if self.absmax is None else self.absmax.numel() * self.absmax.element_size()
        return held + self.range_nbytes() + absmax

    def release(self):
        """Drop everything but a_j (the shortlist, once the layer's candidates are ranked)."""
        if self.xtx is not None:
            self._held = (self.xtx.numel() * self.xtx.element_size(), self.range_nbytes())
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
def noise_variance(stats, smooth, act_cfg, colnorm2=None, parts=None):
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
    smooth: (A, C) smoothing factors (ones for no smoothing). The steps are taken a StepStack block at a
    time (STEP_BLOCK steps) from `parts` (range_parts on smooth's device; None: copied here).
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
    start = 0
    for part in range_parts(stats, inv.device) if parts is None else parts:
        n, start = stats.rows[start:start + part[0].shape[0]], start + part[0].shape[0]
        per_range = [1] * len(n) if g == "token" else [r / part[0].shape[1] if g == "row" else r for r in n]
        m = torch.tensor(per_range, dtype=torch.float64, device=uniform.device)  # (T,)
        if g == "token":
            xs = part[0].unsqueeze(0) * inv[:, None, None, :]              # (A, T, K, C)
            hi_s, top = xs.max(-1)                                          # (A, T, K)
            delta = _interval_width(xs.amin(-1), hi_s, act_cfg)
        else:
            lo, hi = part                                                   # (T, C) or (T, B, C)
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


def range_parts(stats, device):
    """The per-step ranges as StepStack blocks on `device`: [(tokens,)] or [(cmin, cmax)], one pair per block."""
    if stats.granularity == "token":
        return [(x,) for x in stats.tokens.blocks(device)]
    return list(zip(stats.cmin.blocks(device), stats.cmax.blocks(device)))


@torch.no_grad()
def approx_losses(candidates, stats, act_cfg):
    """Predicted loss sum_t mean((Y_q - Y_fp)^2) of every candidate (quant.search.candidates.Candidates) from one
    layer's InputStats: returns (total, weight_term, noise_term) as lists of floats. One candidate's
    dense weight at a time; the ranges are copied to the weight's device once for all candidates."""
    weight = candidates.weight
    out = weight.shape[0]
    n = stats.mean_rows()
    m = stats.xtx.to(weight.device)
    weight_terms, noise_terms = [], []
    parts = range_parts(stats, weight.device) if stats.granularity is not None else None
    for k in range(len(candidates.alphas)):
        s, ws = candidates.smooth[k:k + 1], candidates.smoothed_weight(k).unsqueeze(0)
        d = (ws / s[:, None, :] - weight).to(m.dtype)                         # (1, out, in)
        # sums row by row, then over rows: one thread per row's sum, so the same bits at any thread count
        # (a sum over both dims splits its reduction by the thread count)
        weight_terms.append(((d @ m) * d).sum(-1).sum(-1) / (n * out))
        ws2 = candidates.noisy_weight(k).unsqueeze(0).double().pow(2)  # svd_first: the branch sees no rounding
        uniform, clamped = noise_variance(stats, s, act_cfg, colnorm2=ws2.sum(1), parts=parts)
        noise_terms.append((uniform.to(ws2.device) * ws2.sum(-1).sum(-1) + clamped.to(ws2.device)) / out)
    wt, nt = torch.cat(weight_terms), torch.cat(noise_terms)
    return (wt + nt).tolist(), wt.tolist(), nt.tolist()

