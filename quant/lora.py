"""Training-free LoRA branch: alternate quantization and a low-rank fit (docs/METHOD.md §5).

    L, R = 0
    repeat T times:
        Q    = quantize(W - L R)
        L, R = rank-r truncated SVD of (W - Q), sqrt(S) split to both sides

The low-rank branch absorbs the largest directions of the quantization error,
and re-quantizing W - L R lets Q spend its grid on what the branch cannot carry.
Weights may carry leading dims (stacked candidates, e.g. one per alpha): the
loop then runs on the whole stack at once.
"""
from dataclasses import dataclass

import torch

from quant.quantizer import QWeight, dequantize_weight


@dataclass
class LoraFit:
    """Result of fit_lora for a weight (..., out, in).

    q: dequantized final Q; qweight: its QWeight; L (..., out, r); R (..., r, in).
    errors: (iters, ...) ||W - Q - L R||_F after each iteration (one entry for rank 0).
    rtn_error: (...) ||W - Q(W)||_F of plain round-to-nearest (= the first Q).
    """
    q: torch.Tensor
    qweight: QWeight
    L: torch.Tensor
    R: torch.Tensor
    errors: torch.Tensor
    rtn_error: torch.Tensor

    @property
    def effective(self):
        """Q + L R: the weight the layer effectively applies."""
        return self.q + self.L @ self.R

    def __getitem__(self, k):
        """The fit of stacked candidate k."""
        return LoraFit(self.q[k], self.qweight[k], self.L[k], self.R[k], self.errors[:, k], self.rtn_error[k])

    @staticmethod
    def cat(fits):
        """Concatenate fits of consecutive chunks of stacked candidates."""
        if len(fits) == 1:
            return fits[0]
        qws = [f.qweight for f in fits]
        qweight = QWeight(torch.cat([q.codes for q in qws]), torch.cat([q.scale for q in qws]),
                          torch.cat([q.zero for q in qws]), qws[0].cfg)
        return LoraFit(torch.cat([f.q for f in fits]), qweight, torch.cat([f.L for f in fits]),
                       torch.cat([f.R for f in fits]), torch.cat([f.errors for f in fits], dim=1),
                       torch.cat([f.rtn_error for f in fits]))


def _lowrank_svd(a, q, niter=2, seed=0):
    """Randomized truncated SVD (Halko et al.) with its own generator: deterministic, global RNG untouched."""
    gen = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(*a.shape[:-2], a.shape[-1], q, generator=gen, device=a.device, dtype=a.dtype)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(a.transpose(-1, -2) @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    u, s, vh = torch.linalg.svd(basis.transpose(-1, -2) @ a, full_matrices=False)
    return basis @ u, s, vh


def low_rank_factors(e, rank, svd="full"):
    """Best rank-r factorisation E ~ L R with sqrt(S) on both sides."""
    if svd == "full":
        u, s, vh = torch.linalg.svd(e, full_matrices=False)
    elif svd == "lowrank":
        u, s, vh = _lowrank_svd(e, min(rank + 8, *e.shape[-2:]))
    else:
        raise ValueError(f"svd must be 'full' or 'lowrank', got {svd!r}")
    root = s[..., :rank].sqrt()
    return u[..., :rank] * root.unsqueeze(-2), root.unsqueeze(-1) * vh[..., :rank, :]


def fit_lora(w, quantize_fn, rank=32, iters=10, svd="full"):
    """Alternating quantize / rank-r fit; quantize_fn(float weight) -> QWeight.

    rank 0 is plain round-to-nearest (empty L and R, one error entry).
    """
    w = w.detach()
    w = w if w.dtype in (torch.float32, torch.float64) else w.float()
    out, inp = w.shape[-2:]
    if not 0 <= rank <= min(out, inp):
        raise ValueError(f"LoRA rank must be in 0..min(out, in) = {min(out, inp)}, got {rank}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    lead = w.shape[:-2]
    L, R = w.new_zeros(*lead, out, rank), w.new_zeros(*lead, rank, inp)
    errors = []
    for _ in range(iters if rank else 1):
        qweight = quantize_fn(w - L @ R)
        q = dequantize_weight(qweight).to(w.dtype)
        if not errors:
            rtn_error = torch.linalg.matrix_norm(w - q)
        if rank:
            L, R = low_rank_factors(w - q, rank, svd)
        errors.append(torch.linalg.matrix_norm(w - q - L @ R))
    return LoraFit(q, qweight, L, R, torch.stack(errors), rtn_error)
