"""QuantLinear: the quantized linear layer with explicit state (docs/METHOD.md §5-§7).

    y = xq Q^T + (xq R^T) L^T + b,   xq = fq_act(x / smooth)

With lora_input "smoothed" (--lora-order svd_first, quant/svd_branch.py) the branch is fed x / smooth
itself, unquantized: y = xq Q^T + ((x / smooth) R^T) L^T + b.

Q (`weight`) is the dequantized low-bit weight in the smoothed domain, kept in
float for the fake-quantized forward; `codes`, `scale`, `zero` hold the same
weight as integers for saving and integer kernels. `smooth` is the input
divisor s; folding moves it into the previous layer and sets it to None.
"""
import torch.nn as nn
import torch.nn.functional as F

from quant.method.quantizer import QWeight, dequantize_weight, fake_quantize_act
from quant.quant_config import LORA_INPUTS


class QuantLinear(nn.Module):
    """Linear layer with a low-bit weight, a LoRA branch and optional activation quantization.

    act_cfg None keeps activations in float (weight-only quantization, e.g. the adaLN linears of
    --quantize-adaln). lora_L (out, r) and lora_R (r, in) may have r = 0.
    """

    def __init__(self, qweight, bias=None, lora_L=None, lora_R=None, smooth=None, act_cfg=None,
                 lora_input="quantized"):
        super().__init__()
        if lora_input not in LORA_INPUTS:
            raise ValueError(f"lora_input must be one of {LORA_INPUTS}, got {lora_input!r}")
        self.lora_input = lora_input
        self.out_features, self.in_features = qweight.codes.shape
        self.weight_cfg, self.act_cfg = qweight.cfg, act_cfg
        self.register_buffer("codes", qweight.codes)
        self.register_buffer("scale", qweight.scale)
        self.register_buffer("zero", qweight.zero)
        self.register_buffer("weight", dequantize_weight(qweight))
        self.register_buffer("bias", None if bias is None else bias.detach().to(self.weight))
        like_weight = lambda t: t.detach().to(self.weight).contiguous()  # noqa: E731
        empty = self.weight.new_zeros
        self.register_buffer("lora_L", empty(self.out_features, 0) if lora_L is None else like_weight(lora_L))
        self.register_buffer("lora_R", empty(0, self.in_features) if lora_R is None else like_weight(lora_R))
        self.register_buffer("smooth", None if smooth is None else like_weight(smooth))
        # set by quant/method/fold.py when a row divisor could not go into the integer codes (reference scheme):
        # weight == diag(fold_row_scale) dequant(codes, scale, zero), and the codes no longer describe it
        self.fake_quant_only = False
        self.register_buffer("fold_row_scale", None, persistent=False)
        if self.lora_L.shape != (self.out_features, self.lora_R.shape[0]) or self.lora_R.shape[1] != self.in_features:
            raise ValueError(f"LoRA shapes {tuple(self.lora_L.shape)} x {tuple(self.lora_R.shape)} do not fit a "
                             f"{self.out_features}x{self.in_features} layer")

    @property
    def qweight(self):
        return QWeight(self.codes, self.scale, self.zero, self.weight_cfg)

    def set_qweight(self, qweight):
        """Replace the low-bit weight (e.g. after folding a row scale into its group scales)."""
        self.codes, self.scale, self.zero = qweight.codes, qweight.scale, qweight.zero
        self.recompute_weight()

    def recompute_weight(self):
        """weight = dequant(codes, scale, zero) again (after scale or zero changed in place, e.g. the
        fp16 rounding of quant.io.checkpoint.round_for_storage)."""
        self.weight = dequantize_weight(self.qweight).to(self.weight)

    def forward(self, x):
        if self.smooth is not None:
            x = x / self.smooth
        xs = x
        if self.act_cfg is not None:
            x = fake_quantize_act(x, self.act_cfg)
        y = F.linear(x, self.weight, self.bias)
        if self.lora_R.shape[0]:
            y = y + F.linear(F.linear(xs if self.lora_input == "smoothed" else x, self.lora_R), self.lora_L)
        return y

    def lower_bias(self, delta):
        """bias -= delta (out,), e.g. the layer's mean output error (quant/calibration/bias.py); a bias-free layer
        gets -delta as its bias."""
        delta = delta.detach().to(self.weight)
        self.bias = -delta if self.bias is None else self.bias - delta

    @classmethod
    def from_search(cls, layer_quant, act_cfg):
        """Build from an AlphaSearch candidate (search.best() or search.candidate(k))."""
        lq = layer_quant
        return cls(lq.qweight, lq.bias, lq.lora_L, lq.lora_R, lq.smooth, act_cfg, lq.lora_input)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rank={self.lora_R.shape[0]}, smooth={self.smooth is not None}, "
                f"{'lora_input=smoothed, ' if self.lora_input == 'smoothed' else ''}weight_cfg={self.weight_cfg}, act_cfg={self.act_cfg}")
