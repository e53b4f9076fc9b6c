"""Uniform affine quantization of weights and activations (docs/METHOD.md §5, §6, §8).

One min/max -> (scale, zero) -> codes implementation serves every path. The two
schemes differ only in

* the number of steps the range is split into: `ditas` uses 2^b - 1 (the range
  maps exactly onto the 2^b codes), `reference` uses 2^b like the released code
  (the top of the range is clipped to code 2^b - 1);
* the weight groups: `ditas` groups `group_size` consecutive input columns of
  one output row (integer GEMM K-blocks), `reference` groups 32 elements of one
  input column, rows strided by out/32 (the released reshape to (32, numel/32)).

Zero points are stored as integers z (in a float tensor): w_hat = (codes - z) * scale.
The reference weight path evaluates the released formulas literally, with the
float offset zero = round(min/scale)*scale = -z*scale:
codes = round((w - zero)/scale), w_hat = codes*scale + zero, so that rounding
ties resolve as in the released code. z may lie outside [0, 2^b - 1] when a
group does not straddle 0 (the range is not forced to include 0).
"""
from dataclasses import dataclass, replace

import torch

from quant.quant_config import WeightQuantConfig

REFERENCE_GROUP_ROWS = 32  # the released code reshapes every weight to (32, numel/32)


# ---------------------------------------------------------------------------
# The shared core: range -> (scale, zero) -> codes -> values
# ---------------------------------------------------------------------------

def num_intervals(bits, scheme):
    """How many intervals the [min, max] range is divided into (2^b - 1, or the released 2^b)."""
    return 2 ** bits - 1 if scheme == "ditas" else 2 ** bits


def affine_params(xmin, xmax, intervals):
    """Asymmetric scale and integer zero point z = round(-min/scale).

    A constant group (max == min == v) gets scale |v| (1 if v == 0) so that
    code 0 decodes exactly to v instead of dividing by zero.
    """
    rng = xmax - xmin
    fallback = torch.where(xmin != 0, xmin.abs(), torch.ones_like(xmin))
    scale = torch.where(rng > 0, rng / intervals, fallback)
    zero = torch.round(-xmin / scale)
    return scale, zero


def symmetric_params(absmax, bits):
    """Symmetric scale absmax/(2^(b-1)-1); signed codes are stored offset by z = 2^(b-1)."""
    scale = absmax / (2 ** (bits - 1) - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.full_like(scale, 2 ** (bits - 1))


def encode(x, scale, zero, bits, offset_form=False):
    """Integer codes (as floats) in [0, 2^b - 1].

    offset_form evaluates round((x - zero_offset)/scale) with the float offset
    zero_offset = -zero*scale, as the released weight quantizer does; otherwise
    round(x/scale) + zero. The two agree except at exact rounding ties.
    """
    q = torch.round((x + zero * scale) / scale) if offset_form else torch.round(x / scale) + zero
    return q.clamp_(0, 2 ** bits - 1)


def decode(codes, scale, zero, offset_form=False):
    """Values of the codes: (codes - zero)*scale, or codes*scale + zero_offset."""
    return codes * scale - zero * scale if offset_form else (codes - zero) * scale


def _compute_dtype(x):
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------

@dataclass
class QWeight:
    """A quantized weight (..., out, in).

    codes: uint8, same shape as the weight. scale, zero: float, one entry per group:
    ditas (..., out, in // group_size) (group_size None: (..., out, 1)); reference
    (..., out // 32, in) where entry [q, j] covers rows q, q + out/32, ... of column j.
    Leading dims (stacked candidates) are allowed and can be indexed with qw[k].
    """
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    cfg: WeightQuantConfig

    @property
    def shape(self):
        return self.codes.shape

    def __getitem__(self, idx):
        """Select along leading (stacking) dims."""
        return QWeight(self.codes[idx], self.scale[idx], self.zero[idx], self.cfg)

    def clone(self):
        """Own copies (e.g. to free a stack of candidates after selecting one)."""
        return QWeight(self.codes.clone(), self.scale.clone(), self.zero.clone(), self.cfg)

    def to(self, device):
        return QWeight(self.codes.to(device), self.scale.to(device), self.zero.to(device), self.cfg)


def _group_view(w, cfg):
    """View w (..., out, in) so one dim indexes the elements of a group; returns (view, that dim)."""
    out, inp = w.shape[-2:]
    lead = w.shape[:-2]
    if cfg.scheme == "reference":
        if out % REFERENCE_GROUP_ROWS:
            raise ValueError(f"reference scheme needs out_features to be a multiple of "
                             f"{REFERENCE_GROUP_ROWS}, got {out}")
        # == w.flatten().reshape(32, numel/32) of the released code (column m <-> (q, j)).
        return w.reshape(*lead, REFERENCE_GROUP_ROWS, out // REFERENCE_GROUP_ROWS, inp), -3
    g = inp if cfg.group_size is None else cfg.group_size
    if inp % g:
        raise ValueError(f"group_size {g} does not divide in_features {inp}")
    return w.reshape(*lead, out, inp // g, g), -1


def quantize_weight(w, cfg):
    """Round-to-nearest quantization of a weight (..., out, in) -> QWeight."""
    wf = _compute_dtype(w.detach())
    view, dim = _group_view(wf, cfg)
    if cfg.symmetric:
        scale, zero = symmetric_params(view.abs().amax(dim), cfg.bits)
    else:
        scale, zero = affine_params(view.amin(dim), view.amax(dim), num_intervals(cfg.bits, cfg.scheme))
    codes = encode(view, scale.unsqueeze(dim), zero.unsqueeze(dim), cfg.bits,
                   offset_form=cfg.scheme == "reference")
    return QWeight(codes.to(torch.uint8).reshape(w.shape), scale, zero, cfg)


def dequantize_weight(q):
    """Float values of a QWeight (float32 unless scales are float64)."""
    view, dim = _group_view(q.codes.to(q.scale.dtype), q.cfg)
    w = decode(view, q.scale.unsqueeze(dim), q.zero.unsqueeze(dim), offset_form=q.cfg.scheme == "reference")
    return w.reshape(q.codes.shape)


def fake_quantize_weight(w, cfg):
    return dequantize_weight(quantize_weight(w, cfg))


def scale_qweight_columns(q, s):
    """Q diag(s) as a QWeight: valid when groups lie in one input column (reference scheme).

    Multiplying a group's scale by s_j scales its values by s_j and keeps codes
    and integer zero points: Q(W diag s) = Q(W) diag s.
    """
    if q.cfg.scheme != "reference":
        raise ValueError("column scaling of a QWeight needs groups inside one input column (reference scheme)")
    return replace(q, scale=q.scale * s.to(q.scale))


def scale_qweight_rows(q, r):
    """diag(r) Q as a QWeight: valid when groups lie in one output row (ditas scheme)."""
    if q.cfg.scheme != "ditas":
        raise ValueError("row scaling of a QWeight needs groups inside one output row (ditas scheme)")
    return replace(q, scale=q.scale * r.to(q.scale).unsqueeze(-1))


def pack_int4(codes):
    """Two 4-bit codes per byte along the last dim, low nibble first: (..., K) -> (..., K/2)."""
    if codes.dtype != torch.uint8:
        raise ValueError(f"pack_int4 expects uint8 codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dim, got {codes.shape[-1]}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("pack_int4 got codes above 15")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed):
    """Inverse of pack_int4: (..., K/2) uint8 -> (..., K)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


# ---------------------------------------------------------------------------
# Activations (dynamic ranges)
# ---------------------------------------------------------------------------

def _act_reduce_dims(ndim, granularity, stack_dims):
    """Dims sharing one range. Leading `stack_dims` index independent tensors (e.g. alpha candidates)."""
    if granularity == "token":
        return (ndim - 1,)
    first = stack_dims + 1 if granularity == "row" and ndim - stack_dims >= 2 else stack_dims
    return tuple(range(first, ndim))


def _act_params(x, cfg, stack_dims):
    dims = _act_reduce_dims(x.dim(), cfg.granularity, stack_dims)
    return affine_params(x.amin(dims, keepdim=True), x.amax(dims, keepdim=True), num_intervals(cfg.bits, cfg.scheme))


def quantize_act(x, cfg, stack_dims=0):
    """Dynamic asymmetric quantization -> (uint8 codes, scale, zero), scale/zero broadcastable to x."""
    xf = _compute_dtype(x)
    scale, zero = _act_params(xf, cfg, stack_dims)
    return encode(xf, scale, zero, cfg.bits).to(torch.uint8), scale, zero


def fake_quantize_act(x, cfg, stack_dims=0):
    """quantize_act then decode, in x's dtype (range computed in float32 or better)."""
    xf = _compute_dtype(x)
    scale, zero = _act_params(xf, cfg, stack_dims)
    return decode(encode(xf, scale, zero, cfg.bits), scale, zero).to(x.dtype)
