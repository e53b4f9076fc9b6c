"""Fold TAS smoothing factors into the preceding layers for inference (docs/METHOD.md §7).

A QuantLinear with `smooth` = s computes fq(x / s) ...; folding makes the layer
before it emit x / s directly, so the run-time divide disappears:

* qkv, fc1 -- input h = LN(x) (1 + scale) + shift, with (shift, scale) rows of the
  block's adaLN linear (chunks 0, 1 for qkv; 3, 4 for fc1; chunk size = hidden).
  h / s = LN(x) (1 + scale') + shift' with
      shift' = shift / s                 -> W_sh / s,  b_sh / s
      scale' = (1 + scale) / s - 1       -> W_sc / s,  (b_sc + 1 - s) / s
* proj -- input = attention output = softmax(QK^T) V, linear in V, channel h*D_h + d
  of it is V channel h*D_h + d, i.e. qkv output row 2D + h*D_h + d. Dividing those
  rows of qkv's effective weight (Q + L R), its bias and the rows of lora_L by s
  divides the attention output by s.
    - ditas scheme: weight groups lie inside one output row, so a row divisor is a
      factor on that row's group scales: codes and integer zero points are unchanged
      and `codes/scale/zero` stay the exact integer form of the (rescaled) weight.
    - reference scheme: groups span 32 rows of one column, so a row divisor is not
      representable in the codes. The dequantized `weight` is rescaled and the
      layer is marked `fake_quant_only = True`, with the non-persistent buffer
      `fold_row_scale` (out,) recording weight == diag(fold_row_scale) dequant(codes,
      scale, zero). The reference scheme is a fake-quantized reproduction anyway.
* fc2 -- its input is GELU(fc1(.)), not linear in anything foldable: its `smooth`
  stays and the divide runs on the fly.

The adaLN linear may itself be a weight-only QuantLinear (--quantize-adaln: ditas scheme, one
scale per output row): dividing its shift/scale rows by s multiplies those rows' scales by 1/s
(quantizer.scale_qweight_rows), codes unchanged; its bias gets b_sh / s, (b_sc + 1 - s) / s.

With activation quantization off the folded model is the same function up to float
rounding. With it on, the quantizer input is the same value computed by a different
float expression, so a handful of elements lying on a rounding boundary may land one
code apart; the functions agree up to that.
"""
import torch
import torch.nn as nn

from quant.nn.qlinear import QuantLinear
from quant.method.quantizer import scale_qweight_rows


def _smooth_of(layer):
    return getattr(layer, "smooth", None) if isinstance(layer, QuantLinear) else None


def _div_rows(t, rows, s64):
    t[rows] = (t[rows].to(torch.float64) / s64.view(-1, *[1] * (t.dim() - 1))).to(t.dtype)


@torch.no_grad()
def _div_weight_rows(layer, rows, s64):
    """Divide output rows `rows` of the layer's weight (not its bias) by s64.

    nn.Linear: the float weight. QuantLinear: the rows of lora_L, and
      - ditas scheme: the rows' group scales (exact: codes and integer zero points unchanged);
      - reference scheme (groups span rows): the dequantized weight, marking the layer
        fake_quant_only with fold_row_scale (see the module docstring).
    """
    if not isinstance(layer, QuantLinear):
        _div_rows(layer.weight, rows, s64)
        return
    if layer.lora_L.numel():
        _div_rows(layer.lora_L, rows, s64)
    r = torch.ones(layer.out_features, dtype=torch.float64, device=s64.device)
    r[rows] = 1 / s64
    if layer.weight_cfg.scheme == "ditas" and not layer.fake_quant_only:
        # exact: r_i multiplies every group scale of row i; codes and zero points unchanged
        layer.set_qweight(scale_qweight_rows(layer.qweight, r))
    else:
        _div_rows(layer.weight, rows, s64)
        prev = layer.fold_row_scale
        total = r.to(layer.weight.dtype) if prev is None else prev * r.to(prev)
        layer.fold_row_scale = total
        layer.fake_quant_only = True


@torch.no_grad()
def _fold_into_modulation(ada, chunk_shift, chunk_scale, hidden, s):
    """Make adaLN's (shift, scale) chunks produce the modulation of h / s (nn.Linear or a QuantLinear
    from --quantize-adaln: then the row divisor goes into its per-row group scales)."""
    b = ada.bias
    s64 = s.to(torch.float64)
    sh = slice(chunk_shift * hidden, (chunk_shift + 1) * hidden)
    sc = slice(chunk_scale * hidden, (chunk_scale + 1) * hidden)
    _div_weight_rows(ada, sh, s64)
    _div_weight_rows(ada, sc, s64)
    b[sh] = (b[sh].to(torch.float64) / s64).to(b.dtype)
    b[sc] = ((b[sc].to(torch.float64) + 1 - s64) / s64).to(b.dtype)


@torch.no_grad()
def _fold_into_v_rows(qkv, hidden, s):
    """Divide the V output rows (2D..3D) of qkv (QuantLinear or nn.Linear) by s."""
    s64 = s.to(torch.float64)
    rows = slice(2 * hidden, 3 * hidden)
    if qkv.bias is not None:
        _div_rows(qkv.bias, rows, s64)
    _div_weight_rows(qkv, rows, s64)


def fold_block(block):
    """Fold the qkv, fc1 and proj smoothing factors of one DiTBlock (in place); returns the folded names."""
    hidden = block.attn.qkv.in_features
    ada = block.adaLN_modulation[-1]
    if not isinstance(ada, (nn.Linear, QuantLinear)) or ada.out_features != 6 * hidden or ada.bias is None:
        raise ValueError(f"expected the block's adaLN linear to be Linear({hidden}, {6 * hidden}), got {ada}")
    folded = []
    for name, layer, chunks in (("attn.qkv", block.attn.qkv, (0, 1)), ("mlp.fc1", block.mlp.fc1, (3, 4))):
        s = _smooth_of(layer)
        if s is not None:
            _fold_into_modulation(ada, *chunks, hidden, s.to(ada.weight.device))
            layer.smooth = None
            folded.append(name)
    proj = block.attn.proj
    s = _smooth_of(proj)
    if s is not None:
        _fold_into_v_rows(block.attn.qkv, hidden, s.to(proj.weight.device))
        proj.smooth = None
        folded.append("attn.proj")
    return folded


def fold_smoothing(model):
    """Fold the smoothing factors of every block's qkv, proj and fc1 into adaLN / V rows, in place.

    Layers without smoothing (plain nn.Linear, or QuantLinear with smooth None) are
    skipped; fc2 keeps its on-the-fly divide. Calling it twice is a no-op the second
    time. Returns the model.
    """
    for block in model.blocks:
        fold_block(block)
    return model
