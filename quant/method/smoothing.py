"""Temporal-aggregated smoothing (TAS), docs/METHOD.md §3.

Y = X W^T + b = (X / s) (W diag(s))^T + b for any positive s: dividing the
activation channels by s moves their outliers into the weight columns.
s_j = clamp(a_j^alpha / w_j^(1 - alpha), min=1e-4), where a_j is the channel's
absolute maximum over all calibration steps and w_j the weight column's, each floored per scheme
(FLOORS).
"""
from dataclasses import dataclass

import torch


def channel_absmax(x):
    """max |x| over every dim but the last -> (C,) float32."""
    x = x.detach()
    return x.abs().amax(dim=tuple(range(x.dim() - 1))).float() if x.dim() > 1 else x.abs().float()


def weight_channel_absmax(w):
    """max_i |W[i, j]| -> (in,) float32."""
    return w.detach().abs().amax(dim=-2).float()


@dataclass(frozen=True)
class Floors:
    """The lower bounds of s_j's inputs: act on a_j, weight on w_j (s_j itself: >= 1e-4 in both schemes)."""
    act: float
    weight: float


# reference: the released code's clamps, 1e-4 on every step's activation maximum (the same as on their
# maximum a_j: max is exact) and 1e-4 on w_j. ditas: a_j as measured (a dead channel, a_j = 0, gets
# s_j = 1e-4 for alpha > 0) and w_j floored at 1e-5, SmoothQuant's, only to keep an all-zero column finite.
FLOORS = {"ditas": Floors(act=0.0, weight=1e-5), "reference": Floors(act=1e-4, weight=1e-4)}
MIN_SMOOTH = 1e-4


def smoothing_factors(act_absmax, w_absmax, alpha, scheme="ditas"):
    """s_j = clamp(max(a_j, act)^alpha / max(w_j, weight)^(1 - alpha), min=1e-4), floors FLOORS[scheme].

    alpha may be a float or a 1-D sequence/tensor of n alphas (result (n, C)). Degenerate channels
    stay finite: an all-zero weight column gets a large finite s rather than inf; in the ditas scheme
    a_j = 0 gives 0^alpha = 0 (1 at alpha = 0) and hence s_j = 1e-4.
    """
    floors = FLOORS[scheme]
    a = act_absmax.float().clamp(min=floors.act)  # (ditas' floor 0 leaves a maximum as it is)
    w = w_absmax.float().clamp(min=floors.weight)
    alpha = torch.as_tensor(alpha, dtype=torch.float32, device=a.device)
    if alpha.dim() == 1:
        alpha = alpha[:, None]
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=MIN_SMOOTH)


class RunningAbsMax:
    """Per-channel max |x| aggregated over calibration steps (the TAS statistic a_j)."""

    def __init__(self):
        self.value = None
        self.steps = 0

    def update(self, x):
        m = channel_absmax(x)
        self.value = m if self.value is None else torch.maximum(self.value, m)
        self.steps += 1
        return self

    @classmethod
    def merge(cls, parts):
        """The statistic of every part's inputs (parts: chunks of the same steps)."""
        out = cls()
        for p in parts:
            out.value = p.value if out.value is None else torch.maximum(out.value, p.value)
        out.steps = max(p.steps for p in parts)
        return out

    def nbytes(self):
        return 0 if self.value is None else self.value.numel() * self.value.element_size()
