"""QuantLinear: forward semantics, both schemes, consistency with the search."""
import pytest
import torch
import torch.nn as nn

from quant.nn.qlinear import QuantLinear
from quant.method.quantizer import dequantize_weight, fake_quantize_act, quantize_weight
from quant.quant_config import ActQuantConfig, WeightQuantConfig
from quant.search.candidates import AlphaSearch, quantize_linear
from quant.method.smoothing import channel_absmax, smoothing_factors, weight_channel_absmax

torch.set_num_threads(1)


def _linear(inp=64, out=96, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out)
    with torch.no_grad():
        lin.weight[:, [2, 30]] *= 8.0
    x = torch.randn(4, 5, inp)
    x[..., [7, 41]] *= 30.0
    return lin, x


def _rel_err(y, ref):
    return ((y - ref).norm() / ref.norm()).item()


def test_8bit_weights_no_act_quant_close_to_float():
    lin, x = _linear()
    ql = quantize_linear(lin, None, None, WeightQuantConfig(bits=8, group_size=32), None, lora_rank=0)
    assert (ql.in_features, ql.out_features) == (64, 96) and ql.smooth is None
    with torch.no_grad():
        assert _rel_err(ql(x), lin(x)) < 2e-2  # outlier input channels amplify the 8-bit weight error


def test_smoothing_with_lossless_quantizers_keeps_output():
    """With 8-bit weights, float activations and smoothing, QuantLinear = x/s @ Q(W s)^T + b."""
    lin, x = _linear()
    s = smoothing_factors(channel_absmax(x), weight_channel_absmax(lin.weight), 0.5)
    qw = quantize_weight(lin.weight.detach() * s, WeightQuantConfig(bits=8, group_size=32))
    ql = QuantLinear(qw, lin.bias, smooth=s)
    with torch.no_grad():
        torch.testing.assert_close(ql(x), (x / s) @ dequantize_weight(qw).T + lin.bias)
        assert _rel_err(ql(x), lin(x)) < 5e-3
        built = quantize_linear(lin, 0.5, channel_absmax(x), WeightQuantConfig(bits=8, group_size=32),
                                       None, lora_rank=0)
        torch.testing.assert_close(built(x), ql(x))


@pytest.mark.parametrize("scheme", ["ditas", "reference"])
def test_more_weight_bits_less_error(scheme):
    lin, x = _linear()
    acfg = ActQuantConfig(bits=8, granularity="row" if scheme == "ditas" else "tensor", scheme=scheme)
    errs = {}
    with torch.no_grad():
        for bits in (4, 8):
            wcfg = WeightQuantConfig(bits=bits, group_size=32, scheme=scheme)
            ql = quantize_linear(lin, 0.5, channel_absmax(x), wcfg, acfg, lora_rank=4, lora_iters=3)
            errs[bits] = _rel_err(ql(x), lin(x))
    assert errs[8] < errs[4] < 0.2, errs


def test_input_shapes():
    lin, x = _linear()
    ql = quantize_linear(lin, 0.5, channel_absmax(x), WeightQuantConfig(bits=4, group_size=32),
                                ActQuantConfig(granularity="token"), lora_rank=4, lora_iters=2)
    with torch.no_grad():
        y3 = ql(x)
        y2 = ql(x.reshape(-1, 64))
    assert y3.shape == (4, 5, 96) and y2.shape == (20, 96)
    torch.testing.assert_close(y3.reshape(-1, 96), y2)  # per-token ranges do not depend on the layout


def test_reference_layer_is_quantized_then_smoothed():
    lin, x = _linear()
    wcfg = WeightQuantConfig(bits=4, scheme="reference")
    search = AlphaSearch.of_layer(lin.weight, lin.bias, channel_absmax(x), [0.6], wcfg, None, lora_rank=4, lora_iters=3)
    fit, s = search.candidates.fit, search.candidate(0).smooth
    q = dequantize_weight(fit.qweight)  # the search keeps the integer form only
    torch.testing.assert_close(s, smoothing_factors(channel_absmax(x), weight_channel_absmax(q), 0.6))
    ql = QuantLinear.from_search(search.candidate(0), None)
    torch.testing.assert_close(ql.weight, q * s)
    torch.testing.assert_close(ql.lora_R, fit.R * s)
    assert torch.equal(ql.codes, fit.qweight.codes)
    with torch.no_grad():  # unquantized activations: smoothing cancels, the layer is Q + L R on x
        torch.testing.assert_close(ql(x), x @ (q + fit.L @ fit.R).T + lin.bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["ditas", "reference"])
def test_from_search_reproduces_search_loss(scheme):
    lin, x = _linear()
    acfg = ActQuantConfig(bits=6, granularity="row", scheme=scheme)
    search = AlphaSearch.of_layer(lin.weight, lin.bias, channel_absmax(x), [0.3, 0.5, 0.7],
                                  WeightQuantConfig(bits=4, group_size=32, scheme=scheme), acfg, lora_rank=4,
                                  lora_iters=3)
    search.update(x)
    best, losses = search.result()
    ql = QuantLinear.from_search(search.best(), acfg)
    with torch.no_grad():
        loss = ((ql(x) - lin(x)) ** 2).mean().item()
    assert loss == pytest.approx(losses[search.alphas.index(best)], rel=1e-4)


def test_state_and_explicit_forward():
    lin, x = _linear()
    acfg = ActQuantConfig(bits=8)
    ql = quantize_linear(lin, 0.5, channel_absmax(x), WeightQuantConfig(bits=4, group_size=32), acfg,
                                lora_rank=4, lora_iters=2)
    keys = set(ql.state_dict())
    assert {"weight", "codes", "scale", "zero", "bias", "lora_L", "lora_R", "smooth"} <= keys
    assert ql.codes.dtype == torch.uint8 and ql.lora_L.shape == (96, 4) and ql.lora_R.shape == (4, 64)
    with torch.no_grad():
        xq = fake_quantize_act(x / ql.smooth, acfg)
        torch.testing.assert_close(ql(x), xq @ ql.weight.T + lin.bias + (xq @ ql.lora_R.T) @ ql.lora_L.T)
        s, y = ql.smooth.clone(), ql(x)
        ql.smooth = None  # what folding does once the previous layer outputs x / s
        torch.testing.assert_close(ql(x / s), y)
    assert "smooth" not in ql.state_dict()
    with pytest.raises(ValueError):
        QuantLinear(ql.qweight, lora_L=torch.zeros(96, 3), lora_R=torch.zeros(2, 64))
