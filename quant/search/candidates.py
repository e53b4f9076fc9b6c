"""Layer-wise grid search of the smoothing exponent alpha (docs/METHOD.md §4, §5, §8): the concept.

For one linear layer, every candidate alpha k gets smoothing factors s_k and a quantized weight with
its training-free LoRA branch (`Candidates`, prepared once). Each calibration step then adds every
candidate's mean((Y_q,k - Y_fp)^2) on that step's FP input to a running sum (`AlphaSearch.update`),
so no activation history is kept; the smallest sum wins (`select_alpha`). How a step's losses are
evaluated fast is the loss engine's business (quant/search/losses.py); the approximate search
(quant/search/approx.py) predicts the same sums from one pass's statistics instead.

Schemes (docs/METHOD.md §8):
* ditas: s from w_j = max|W[:, j]|; W diag(s) is re-quantized with the LoRA loop for every alpha;
  Y = fq(X/s) (Q + L R)^T + b.
* reference: W (unsmoothed) is quantized with the LoRA loop once; w_j = max|Q[:, j]|; the layer is
  Q diag(s) with branch L (R diag(s)), i.e. Y = (fq(X/s) * s) (Q + L R)^T + b; only the activation
  error depends on alpha.
A candidate alpha of None means "no smoothing" (s = 1).
"""
import copy
from dataclasses import dataclass, replace
from functools import partial

import torch

from quant.method.lora import fit_lora
from quant.nn.qlinear import QuantLinear
from quant.method.quantizer import QWeight, dequantize_weight, pack_int4, scale_qweight_columns, unpack_int4
from quant.quant_config import QuantConfig
from quant.search.losses import LossEngine
from quant.method.smoothing import smoothing_factors, weight_channel_absmax
from quant.method.svd_branch import fit_svd_first, lora_input_of


def select_alpha(losses, alphas):
    """Index of the smallest loss; ties go to the smaller alpha (None, no smoothing, counts as smallest)."""
    return min(range(len(alphas)), key=lambda k: (losses[k], -1.0 if alphas[k] is None else alphas[k]))


@dataclass
class LayerQuant:
    """Everything needed to build the quantized layer for one alpha.

    The layer computes y = fq(x / smooth) (dequant(qweight) + lora_L lora_R)^T + bias, with qweight
    and lora_R in the smoothed domain (reference: Q(W) with column scales times s, and R diag(s)).
    smooth is None without smoothing. weight_error_rtn / weight_error_lora: ||W' - Q(W')||_F and
    ||W' - Q - L R||_F of the weight W' that was quantized (ditas: W diag(s); reference: W).
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
    lora_input: str = "quantized"  # the branch's input: fq(x/s) ("quantized") or x/s ("smoothed", svd_first)

    def to(self, device):
        """The same layer with its tensors on `device`."""
        def move(t):
            return None if t is None else t.to(device)
        return replace(self, smooth=move(self.smooth), qweight=self.qweight.to(device), lora_L=move(self.lora_L),
                       lora_R=move(self.lora_R), bias=move(self.bias))


@dataclass
class Scores:
    """One layer's search result: summed losses per alpha over `steps` steps, the plain round-to-nearest
    baseline's summed loss over `rtn_steps`, extra per-alpha terms for the report, the bytes of
    the operands the scoring kept between steps (LossEngine.nbytes()), and where a shortlist was
    scored, every alpha's predicted summed loss ({alpha: loss}, the ranking it was drawn from)."""
    losses: list
    steps: int
    rtn_loss: float
    rtn_steps: int
    extra: dict
    operand_bytes: int = 0
    predicted: dict | None = None


def _fp_params(weight, bias):
    """A layer's FP weight (float32) and bias as Candidates keeps them: detached, None as None."""
    return (None if weight is None else weight.detach().float()), (None if bias is None else bias.detach())


def lora_settings(scheme, lora_rank=None, lora_iters=None, svd=None):
    """(rank, iterations, svd) of the LoRA fits: the ones given, QuantConfig's defaults for `scheme` for None."""
    default = QuantConfig(scheme=scheme)
    return (default.lora_rank if lora_rank is None else lora_rank,
            default.lora_iters if lora_iters is None else lora_iters, default.svd if svd is None else svd)


def _scheme(weight, bias, act_absmax, alphas, weight_cfg, lora_rank=None, lora_iters=None, scheme=None, svd=None,
            lora_order="residual"):
    """The scheme a Candidates(...) call asks for (default: weight_cfg's)."""
    scheme = weight_cfg.scheme if scheme is None else scheme
    if scheme not in _CLASSES:
        raise ValueError(f"scheme must be 'ditas' or 'reference', got {scheme!r}")
    return scheme


class Candidates:
    """The candidate layers of one linear: smoothing factors and LoRA-fitted quantized weights per alpha,
    stored compactly (integer codes, scales and LoRA factors; no dense float weight per candidate).

    Candidates(weight, bias, act_absmax, alphas, weight_cfg, lora_rank, lora_iters, scheme, svd, lora_order) is a
    DitasCandidates or a ReferenceCandidates, chosen once by `scheme` (default weight_cfg.scheme), as pathlib.Path
    is a PosixPath or a WindowsPath. weight (out, in), bias (out,) or None; act_absmax: the TAS statistic a_j
    (in,), unused when every alpha is None; lora_rank, lora_iters, svd: None takes QuantConfig's default for the
    scheme (lora_settings); lora_order: "residual" (the LoRA fit on the quantization residual, fed fq(x/s)) or
    "svd_first" (ditas: SVD_r(W diag(s)) taken out before quantization, fed x/s; quant/method/svd_branch.py).
    Public state: alphas, scheme, weight (float32, the FP layer's own tensor), bias, smooth (A, in)
    (rows of ones for alpha None), svds (truncated SVDs computed), nbytes() (what is stored).
    """
    scheme = None

    def __new__(cls, *args, **kwargs):
        if cls is Candidates:
            cls = _CLASSES[_scheme(*args, **kwargs)]
        return super().__new__(cls)

    def __init__(self, weight, bias, act_absmax, alphas, weight_cfg, lora_rank=None, lora_iters=None, scheme=None,
                 svd=None, lora_order="residual"):
        self.alphas = list(alphas)
        if not self.alphas:
            raise ValueError("AlphaSearch needs at least one candidate alpha")
        if scheme not in (None, self.scheme):
            raise ValueError(f"{type(self).__name__} holds the {self.scheme} scheme, not {scheme!r}")
        self.weight_cfg = weight_cfg
        self.weight, self.bias = _fp_params(weight, bias)
        rank, iters, svd = lora_settings(self.scheme, lora_rank, lora_iters, svd)
        self.lora_input = lora_input_of(lora_order)
        if lora_order == "svd_first" and self.scheme != "ditas":
            raise ValueError("lora_order svd_first needs the ditas scheme")
        fit = (partial(fit_svd_first, quantize_fn=weight_cfg, rank=rank, svd=svd) if lora_order == "svd_first" else
               partial(fit_lora, quantize_fn=weight_cfg, rank=rank, iters=iters, svd=svd))
        self._fit(act_absmax, fit)

    def subset(self, indices):
        """The candidates `indices` (positions in alphas) alone, as a new Candidates of their own copies
        (the rest can then be freed). svds still counts every fit that was computed."""
        idx = list(indices)
        if not idx:
            raise ValueError("a subset of candidates needs at least one of them")
        new = copy.copy(self)
        new.alphas = [self.alphas[k] for k in idx]
        t = torch.tensor(idx, device=self.smooth.device)
        new.smooth = self.smooth[t].clone()
        new.__dict__.update(self._per_alpha(t))
        return new

    def _factors(self, act_absmax, w_absmax):
        """(n_alpha, in) smoothing factors, rows of ones for alpha None."""
        s = torch.ones(len(self.alphas), self.weight.shape[1], device=self.weight.device)
        for k, a in enumerate(self.alphas):
            if a is not None:
                s[k] = smoothing_factors(act_absmax.to(s.device), w_absmax, a, self.scheme)
        return s

    def on(self, weight, bias):
        """A shallow copy over the layer's FP `weight` and `bias` (None, None: without them, to send to a
        process that has the model; it puts its own back)."""
        new = copy.copy(self)
        new.weight, new.bias = _fp_params(weight, bias)
        return new

    def nbytes(self):
        """Bytes of the stored candidate state (the FP weight and bias are the model's own)."""
        return sum(t.numel() * t.element_size() for t in [self.smooth] + self._stored())

    def smoothed_weight(self, k):
        """W_s (out, in), dense: the weight candidate k applies to X/s_k (Q + L R in the smoothed domain)."""
        L, R = self.lora(k)
        return dequantize_weight(self.qweight(k)).to(self.weight) + L @ R

    def noisy_weight(self, k):
        """The part of smoothed_weight(k) that the activation rounding error passes through: all of it when the
        branch is fed fq(X/s) (residual), Q alone when it is fed X/s (svd_first)."""
        if self.lora_input == "quantized":
            return self.smoothed_weight(k)
        return dequantize_weight(self.qweight(k)).to(self.weight)

    def layer(self, k):
        """LayerQuant of candidate k."""
        alpha, s = self.alphas[k], self.smooth[k]
        errors, rtn = self._errors(k)
        L, R = self.lora(k)
        # clones: the returned layer must not keep the whole candidate stack alive
        return LayerQuant(alpha=alpha, smooth=None if alpha is None else s.clone(), qweight=self.qweight(k).clone(),
                          lora_L=L.clone(), lora_R=R.clone(), bias=self.bias,
                          weight_error_rtn=float(rtn), weight_error_lora=float(errors[-1]),
                          lora_errors=errors.tolist(), lora_input=self.lora_input)


class DitasCandidates(Candidates):
    """The ditas scheme's candidates: one LoRA fit per alpha, one alpha at a time (the transient memory of one fit),
    each subspace fit warm-started from its neighbour's (quant/method/lora.py). Stored: codes (A, out, in) uint8,
    two 4-bit codes per byte (A, out, in / 2) at <= 4 bits (packed); scale, zero (A, out, groups); L (A, out, r),
    R (A, r, in); errors (iterations, A) and rtn_error (A,) of the fits."""
    scheme = "ditas"

    def _fit(self, act_absmax, fit):
        self.smooth = self._factors(act_absmax, weight_channel_absmax(self.weight))
        self.packed = self.weight_cfg.bits <= 4 and self.weight.shape[1] % 2 == 0
        fits, basis = [], None
        for k in range(len(self.alphas)):
            # the residual fit warm-starts from the neighbour's basis; svd_first takes one SVD per alpha
            f = fit(self.weight * self.smooth[k], **({"basis": basis} if self.lora_input == "quantized" else {}))
            basis = f.basis
            codes = pack_int4(f.qweight.codes) if self.packed else f.qweight.codes
            fits.append((codes, f.qweight.scale, f.qweight.zero, f.L, f.R, f.errors, f.rtn_error, f.svds))
            del f
        codes, scale, zero, L, R, errors, rtn, svds = zip(*fits)
        self.codes, self.scale, self.zero = torch.stack(codes), torch.stack(scale), torch.stack(zero)
        self.L, self.R = torch.stack(L), torch.stack(R)
        self.errors, self.rtn_error, self.svds = torch.stack(errors, 1), torch.stack(rtn), sum(svds)

    def _per_alpha(self, t):
        return {"codes": self.codes[t].clone(), "scale": self.scale[t].clone(), "zero": self.zero[t].clone(),
                "L": self.L[t].clone(), "R": self.R[t].clone(), "errors": self.errors[:, t].clone(),
                "rtn_error": self.rtn_error[t].clone()}

    def _stored(self):
        return [self.codes, self.scale, self.zero, self.L, self.R]

    def _errors(self, k):
        return self.errors[:, k], self.rtn_error[k]

    def qweight(self, k):
        """QWeight of candidate k in the smoothed domain (the weight the layer applies to fq(x/s))."""
        codes = unpack_int4(self.codes[k]) if self.packed else self.codes[k]
        return QWeight(codes, self.scale[k], self.zero[k], self.weight_cfg)

    def lora(self, k):
        """(L (out, r), R (r, in)) of candidate k in the smoothed domain."""
        return self.L[k], self.R[k]


class ReferenceCandidates(Candidates):
    """The reference scheme's candidates: one fit of the unsmoothed W (`fit`, a LoraFit without its dense q),
    w_j = max|Q[:, j]|; every alpha applies it to fq(X/s) s, i.e. Q diag(s) with branch L (R diag(s))."""
    scheme = "reference"

    def _fit(self, act_absmax, fit):
        f = fit(self.weight)
        self.smooth = self._factors(act_absmax, weight_channel_absmax(f.q))
        self.fit, self.svds = replace(f, q=None, basis=None), f.svds

    def _per_alpha(self, t):
        return {}

    def _stored(self):
        q = self.fit.qweight
        return [q.codes, q.scale, q.zero, self.fit.L, self.fit.R]

    def _errors(self, k):
        return self.fit.errors, self.fit.rtn_error

    def qweight(self, k):
        """QWeight of candidate k in the smoothed domain (the weight the layer applies to fq(x/s))."""
        q = self.fit.qweight
        return q if self.alphas[k] is None else scale_qweight_columns(q, self.smooth[k])

    def lora(self, k):
        """(L (out, r), R (r, in)) of candidate k in the smoothed domain."""
        return self.fit.L, (self.fit.R if self.alphas[k] is None else self.fit.R * self.smooth[k])

    def effective(self, dtype=None):
        """Q + L R, dense (out, in), computed on demand (not kept) in dtype (default: the FP weight's; float64
        gives the exact values of the stored codes, scales and factors). The ditas scheme has one effective
        weight per alpha: smoothed_weight(k)."""
        dtype = self.weight.dtype if dtype is None else dtype
        q, L, R = self.fit.qweight, self.fit.L.to(dtype), self.fit.R.to(dtype)
        return dequantize_weight(replace(q, scale=q.scale.to(dtype))) + L @ R


_CLASSES = {"ditas": DitasCandidates, "reference": ReferenceCandidates}


class AlphaSearch:
    """Streaming grid search of alpha for one linear layer: Candidates, a loss engine, running sums.

    AlphaSearch(candidates, act_cfg, max_steps, slots, **engine_options): act_cfg None leaves activations
    unquantized; max_steps: updates of a slot after that many are ignored (reference: 50); slots: running sums
    kept apart (one per chunk of the calibration batch, quant/calibration/feed.py), added in order at the end;
    engine_options: the loss engine's chunk, matmul_dtype, impl, row_stride (quant/search/losses.py: candidates
    evaluated together, "bf16" candidate products, the "naive" direct evaluation, scoring every row_stride-th row
    only). AlphaSearch.of_layer builds the Candidates of a layer first.
    """

    def __init__(self, candidates, act_cfg, max_steps=None, slots=1, **engine_options):
        self.candidates = candidates
        self.engine = LossEngine(act_cfg, **engine_options).attach(candidates)
        self.max_steps = max_steps  # per slot
        self.slot_steps = [0] * slots
        self._loss = torch.zeros(slots, len(self.alphas), dtype=torch.float64, device=candidates.weight.device)

    @classmethod
    def of_layer(cls, weight, bias, act_absmax, alphas, weight_cfg, act_cfg, lora_rank=None, lora_iters=None,
                 scheme=None, max_steps=None, svd=None, lora_order="residual", **engine_options):
        """The search over the Candidates(weight, bias, act_absmax, alphas, weight_cfg, lora_rank, lora_iters,
        scheme, svd, lora_order) of one layer."""
        return cls(Candidates(weight, bias, act_absmax, alphas, weight_cfg, lora_rank, lora_iters, scheme, svd,
                              lora_order), act_cfg, max_steps, **engine_options)

    @property
    def alphas(self):
        return self.candidates.alphas

    @torch.no_grad()
    def update(self, x, y=None, slot=0):
        """Add one calibration step's loss for every alpha (to running sum `slot`); x (..., in) is the
        full-precision input, y (optional) the FP layer's output on it (x W^T + b: saves the engine the FP
        product; used where it is float32 on the candidates' device, as the model computes it in float32)."""
        if self.max_steps is not None and self.slot_steps[slot] >= self.max_steps:
            return
        device = self.candidates.weight.device
        if y is not None and (y.dtype != torch.float32 or y.device != device):
            y = None
        self._loss[slot] += self.engine.losses(x.detach().to(device, torch.float32), None if y is None else y.detach())
        self.slot_steps[slot] += 1

    def slot(self, k):
        """(running sum k (n_alpha,) float64, its steps): to carry a slot to another process's search."""
        return self._loss[k].clone(), self.slot_steps[k]

    def set_slot(self, k, state):
        loss, steps = state
        self._loss[k] = loss.to(self._loss.device)
        self.slot_steps[k] = steps

    @property
    def steps(self):
        return sum(self.slot_steps)

    @property
    def losses(self):
        total = self._loss[0].clone()
        for part in self._loss[1:]:  # in slot order: the same sums wherever the slots were filled
            total += part
        return total.tolist()

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
        return self.candidates.layer(k)


def quantize_linear(linear, alpha, act_absmax, weight_cfg, act_cfg, lora_rank=None, lora_iters=None, scheme=None,
                    svd=None):
    """A QuantLinear of an nn.Linear for a fixed alpha (None: no smoothing); the LoRA settings as Candidates'."""
    c = Candidates(linear.weight, linear.bias, act_absmax, [alpha], weight_cfg, lora_rank, lora_iters, scheme, svd)
    return QuantLinear.from_search(c.layer(0), act_cfg)
