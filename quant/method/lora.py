"""Training-free LoRA branch: alternate quantization and a low-rank fit (docs/METHOD.md §5).

    L, R = 0
    repeat T times:
        Q    = quantize(W - L R)
        L, R = rank-r truncated SVD of (W - Q), sqrt(S) split to both sides

The low-rank branch absorbs the largest directions of the quantization error,
and re-quantizing W - L R lets Q spend its grid on what the branch cannot carry.
Weights may carry leading dims (stacked candidates, e.g. one per alpha): the
loop then runs on the whole stack at once.

The truncated SVD (`svd`):
* full: LAPACK's full SVD of W - Q every iteration (the released code's; its cost dominates the
  ditas scheme's calibration, which fits one LoRA branch per alpha);
* lowrank: a randomized SVD (Halko et al.) every iteration, from a fresh random basis;
* subspace: a subspace iteration carried through the alternating loop (beyond the paper). W - Q
  changes little between iterations (only codes on a rounding boundary flip), so each iteration
  starts from the previous one's right singular vectors: U = orth(E V), U^T E = u S V'^T gives the
  factors and the next V, one power step per iteration on the slowly changing error, two products
  of width p = rank + OVERSAMPLE instead of a full SVD. The first iteration starts from `basis`
  (e.g. the fit of the neighbouring alpha) or from a seeded random one, with WARMUP_STEPS extra
  power steps. bench/studies/candidate_fits.py compares it with the full SVD.
"""
import math
from dataclasses import dataclass
from functools import partial

import torch

from quant.method import lapack

from quant import kernels
from quant.method.quantizer import QWeight, dequantize_weight, quantize_weight
from quant.quant_config import WeightQuantConfig

SVDS = ("full", "lowrank", "subspace")
OVERSAMPLE = 16   # subspace/lowrank: basis width p = rank + OVERSAMPLE
WARMUP_STEPS = 2  # subspace: power steps before the first factorisation


@dataclass
class LoraFit:
    """Result of fit_lora for a weight (..., out, in).

    q: dequantized final Q (None once dropped); qweight: its QWeight; L (..., out, r); R (..., r, in).
    errors: (iters, ...) ||W - Q - L R||_F after each iteration (one entry for rank 0).
    rtn_error: (...) ||W - Q(W)||_F of plain round-to-nearest (= the first Q).
    svds: truncated SVDs computed (one per iteration and stacked weight). basis: subspace only, the
    final right singular vectors (..., in, p), a warm start for a neighbouring fit (else None).
    """
    q: torch.Tensor | None
    qweight: QWeight
    L: torch.Tensor
    R: torch.Tensor
    errors: torch.Tensor
    rtn_error: torch.Tensor
    svds: int = 0
    basis: torch.Tensor | None = None

    @property
    def effective(self):
        """Q + L R: the weight the layer effectively applies."""
        return self.q + self.L @ self.R

    def __getitem__(self, k):
        """The fit of stacked candidate k."""
        return LoraFit(None if self.q is None else self.q[k], self.qweight[k], self.L[k], self.R[k],
                       self.errors[:, k], self.rtn_error[k], self.svds, None if self.basis is None else self.basis[k])


def _random_basis(w, p, seed=0):
    """A seeded Gaussian (..., in, p): deterministic, the global RNG untouched."""
    gen = torch.Generator(device=w.device).manual_seed(seed)
    return torch.randn(*w.shape[:-2], w.shape[-1], p, generator=gen, device=w.device, dtype=w.dtype)


def lowrank_svd(a, q, niter=2, seed=0):
    """Randomized truncated SVD (Halko et al.) from a fresh seeded basis."""
    basis = lapack.qr(a @ _random_basis(a, q, seed)).Q
    for _ in range(niter):
        basis = lapack.qr(a.transpose(-1, -2) @ basis).Q
        basis = lapack.qr(a @ basis).Q
    u, s, vh = lapack.svd(basis.transpose(-1, -2) @ a, full_matrices=False)
    return basis @ u, s, vh


def _subspace_svd(a, basis, steps):
    """Truncated SVD of a (..., out, in) in the span of a @ basis after `steps` power steps: (u, s, vh)."""
    for _ in range(steps):
        basis = lapack.qr(a.transpose(-1, -2) @ lapack.qr(a @ basis).Q).Q
    y = a @ basis
    found = _rayleigh_ritz(a, y)
    if found is not None:
        return found
    u = lapack.qr(y).Q  # y numerically rank-deficient: orthonormalise it directly
    uu, s, vh = lapack.svd(u.transpose(-1, -2) @ a, full_matrices=False)
    return u @ uu, s, vh


def _rayleigh_ritz(a, y):
    """The SVD of a projected onto span(y) (..., out, p), from p x p float64 Gram matrices: y = U C
    (C^T C = y^T y, Cholesky), B = U^T a = C^-T (y^T a), B B^T = W diag(s^2) W^T (eigh), so a's
    projection is (y C^-1 W) diag(s) (diag(1/s) W^T B). The same factors as QR of y and an SVD of B,
    at the cost of the two products with a that both need. None where y is numerically rank-deficient
    (the Cholesky factorisation fails, or a Ritz value is ~0 so its right vector is undefined)."""
    yd = y.double()
    c, info = torch.linalg.cholesky_ex(yd.transpose(-1, -2) @ yd, upper=True)
    if bool((info != 0).any()):
        return None
    b = torch.linalg.solve_triangular(c.transpose(-1, -2), (y.transpose(-1, -2) @ a).double(), upper=False)
    lam, w = lapack.eigh(b @ b.transpose(-1, -2))
    lam, w = lam.flip(-1), w.flip(-1)  # descending, as svd
    if bool((lam[..., -1:] <= lam[..., :1] * 1e-24).any()):
        return None
    s = lam.sqrt()
    vh = (w.transpose(-1, -2) @ b) / s.unsqueeze(-1)
    u = y @ torch.linalg.solve_triangular(c, w, upper=True).to(a.dtype)  # well conditioned: a's precision
    return u, s.to(a.dtype), vh.to(a.dtype)


def split_svd(u, s, vh, rank):
    root = s[..., :rank].sqrt()
    return u[..., :rank] * root.unsqueeze(-2), root.unsqueeze(-1) * vh[..., :rank, :]


def low_rank_factors(e, rank, svd="full", niter=2):
    """Best rank-r factorisation E ~ L R with sqrt(S) on both sides (full or randomized SVD, niter power steps)."""
    if svd == "full":
        return split_svd(*lapack.svd(e, full_matrices=False), rank)
    if svd == "lowrank":
        return split_svd(*lowrank_svd(e, min(rank + OVERSAMPLE, *e.shape[-2:]), niter=niter), rank)
    raise ValueError(f"svd must be 'full' or 'lowrank' here, got {svd!r}")


def _fused(w, lr, cfg):
    """Can csrc/weight_quant.c run this step (ditas asymmetric groups of a multiple of 16 columns, CPU float32)?"""
    return (isinstance(cfg, WeightQuantConfig) and cfg.scheme == "ditas" and not cfg.symmetric
            and w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous()
            and (lr is None or lr.is_contiguous()) and (cfg.group_size or w.shape[-1]) % 16 == 0
            and w.shape[-1] % (cfg.group_size or w.shape[-1]) == 0 and kernels.available())


def quantize_residual(w, lr, quantize):
    """(QWeight of w - lr, E = w - its dequantized value): one step of the loop. quantize: a
    WeightQuantConfig (round-to-nearest; in one C pass where it applies, the same bits) or a callable."""
    if _fused(w, lr, quantize):
        k = w.shape[-1]
        codes, scale, zero, e = kernels.quant_residual(w.reshape(-1, k), None if lr is None else lr.reshape(-1, k),
                                                      quantize.group_size or k, 2 ** quantize.bits - 1)
        lead = w.shape[:-1]
        return (QWeight(codes.view(w.shape), scale.view(*lead, -1), zero.view(*lead, -1), quantize),
                e.view(w.shape))
    fn = partial(quantize_weight, cfg=quantize) if isinstance(quantize, WeightQuantConfig) else quantize
    qweight = fn(w if lr is None else w - lr)
    return qweight, w - dequantize_weight(qweight).to(w.dtype)


def fit_lora(w, quantize_fn, rank=32, iters=10, svd="full", basis=None):
    """Alternating quantize / rank-r fit; quantize_fn: a WeightQuantConfig (round-to-nearest with it) or
    a callable (float weight) -> QWeight.

    rank 0 is plain round-to-nearest (empty L and R, one error entry). basis: svd="subspace"'s warm
    start (..., in, p), e.g. a neighbouring fit's LoraFit.basis.
    """
    if svd not in SVDS:
        raise ValueError(f"svd must be one of {SVDS}, got {svd!r}")
    w = w.detach()
    w = w if w.dtype in (torch.float32, torch.float64) else w.float()
    out, inp = w.shape[-2:]
    if not 0 <= rank <= min(out, inp):
        raise ValueError(f"LoRA rank must be in 0..min(out, in) = {min(out, inp)}, got {rank}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    lead = w.shape[:-2]
    L, R = w.new_zeros(*lead, out, rank), w.new_zeros(*lead, rank, inp)
    lr = None  # L @ R of the last iteration: its error, then the next iteration's quantizer input
    p = min(rank + OVERSAMPLE, out, inp)
    steps = 0
    if svd == "subspace" and rank:
        steps = WARMUP_STEPS if basis is None else 0
        basis = _random_basis(w, p) if basis is None else basis.to(w)
    errors, svds = [], 0
    for _ in range(iters if rank else 1):
        qweight, e = quantize_residual(w, lr, quantize_fn)
        if not errors:
            rtn_error = torch.linalg.matrix_norm(e)
        if rank:
            if svd == "subspace":
                u, s, vh = _subspace_svd(e, basis, steps)
                L, R = split_svd(u, s, vh, rank)
                basis, steps = vh.transpose(-1, -2), 0
            else:
                L, R = low_rank_factors(e, rank, svd)
            svds += math.prod(lead)
            lr = L @ R
            e = e.sub_(lr)
        errors.append(torch.linalg.matrix_norm(e))
    q = dequantize_weight(qweight).to(w.dtype)  # the final Q (w - e before the branch was subtracted)
    return LoraFit(q, qweight, L, R, torch.stack(errors), rtn_error, svds,
                   basis if svd == "subspace" and rank else None)
