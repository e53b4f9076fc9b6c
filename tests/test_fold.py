"""Folding the smoothing factors (quant/method/fold.py, docs/METHOD.md §7) keeps the model's function."""
import copy
from functools import partial

import pytest
import torch
import torch.nn as nn

from helpers import random_dit
from quant.method.fold import fold_smoothing
from quant.method.lora import fit_lora
from quant.nn.qlinear import QuantLinear
from quant.method.quantizer import dequantize_weight, quantize_weight, scale_qweight_columns
from quant.quant_config import ActQuantConfig, WeightQuantConfig

torch.set_num_threads(1)
LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _quant_linear(linear, s, scheme, act_cfg, rank=4):
    """A QuantLinear for nn.Linear `linear` with smoothing factors s, built with the quant/ API."""
    wcfg = WeightQuantConfig(bits=4, group_size=32 if scheme == "ditas" else None, scheme=scheme)
    qfn = partial(quantize_weight, cfg=wcfg)
    w, b = linear.weight.detach(), linear.bias.detach()
    if scheme == "ditas":  # smooth first, quantize W diag(s)
        fit = fit_lora(w * s, qfn, rank=rank, iters=2)
        return QuantLinear(fit.qweight, b, fit.L, fit.R, smooth=s, act_cfg=act_cfg)
    fit = fit_lora(w, qfn, rank=rank, iters=2)  # reference: Q(W) diag(s), branch L (R diag(s))
    return QuantLinear(scale_qweight_columns(fit.qweight, s), b, fit.L, fit.R * s, smooth=s, act_cfg=act_cfg)


def _quantize(model, scheme, act_cfg, seed=1, skip=()):
    g = torch.Generator().manual_seed(seed)
    for i, block in enumerate(model.blocks):
        for name in LINEARS:
            if (i, name) in skip:
                continue
            parent, attr = block.get_submodule(name.split(".")[0]), name.split(".")[1]
            linear = getattr(parent, attr)
            s = torch.exp(torch.randn(linear.in_features, generator=g) * 0.8)  # random factors ~ [0.1, 10]
            setattr(parent, attr, _quant_linear(linear, s, scheme, act_cfg))
    return model


def _inputs(n=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 10, (n,), generator=g))


@torch.no_grad()
def _trace(model, x, t, y):
    """(block outputs, final output) of one forward pass."""
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o.clone())) for b in model.blocks]
    try:
        final = model(x, t, y)
    finally:
        for h in hooks:
            h.remove()
    return outs, final


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("scheme", ["ditas", "reference"])
def test_fold_exact_without_act_quant(scheme):
    model = _quantize(random_dit(), scheme, act_cfg=None)
    folded = fold_smoothing(copy.deepcopy(model))
    for block in folded.blocks:
        assert block.attn.qkv.smooth is None and block.attn.proj.smooth is None and block.mlp.fc1.smooth is None
        assert block.mlp.fc2.smooth is not None  # fc2 divides on the fly
    x, t, y = _inputs()
    ref_blocks, ref = _trace(model, x, t, y)
    got_blocks, got = _trace(folded, x, t, y)
    assert len(ref_blocks) == len(got_blocks) == len(model.blocks)
    for a, b in zip(got_blocks, ref_blocks):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    # a second fold is a no-op
    again = fold_smoothing(copy.deepcopy(folded))
    torch.testing.assert_close(_trace(again, x, t, y)[1], got, rtol=0, atol=0)


def test_fold_ditas_keeps_integer_form_consistent():
    model = _quantize(random_dit(), "ditas", act_cfg=None)
    before = [(b.attn.qkv.codes.clone(), b.attn.qkv.zero.clone(), b.attn.qkv.scale.clone(),
               b.attn.proj.smooth.clone()) for b in model.blocks]
    fold_smoothing(model)
    for block, (codes, zero, scale, s) in zip(model.blocks, before):
        qkv, d = block.attn.qkv, block.attn.qkv.in_features
        assert torch.equal(qkv.codes, codes) and torch.equal(qkv.zero, zero)  # codes untouched
        torch.testing.assert_close(qkv.scale[:2 * d], scale[:2 * d], rtol=0, atol=0)  # q, k rows untouched
        torch.testing.assert_close(qkv.scale[2 * d:], scale[2 * d:] / s[:, None])  # v rows' group scales / s
        torch.testing.assert_close(qkv.weight, dequantize_weight(qkv.qweight), rtol=0, atol=0)
        assert not getattr(qkv, "fake_quant_only", False)


def test_fold_reference_marks_fake_quant_only():
    model = _quantize(random_dit(), "reference", act_cfg=None)
    fold_smoothing(model)
    for block in model.blocks:
        qkv, d = block.attn.qkv, block.attn.qkv.in_features
        assert qkv.fake_quant_only
        torch.testing.assert_close(qkv.weight, qkv.fold_row_scale[:, None] * dequantize_weight(qkv.qweight))
        assert torch.all(qkv.fold_row_scale[:2 * d] == 1)
        assert "fold_row_scale" not in qkv.state_dict()  # not a checkpoint tensor


@pytest.mark.parametrize("scheme,granularity", [("ditas", "row"), ("ditas", "tensor"), ("reference", "tensor")])
def test_fold_with_act_quant_is_close(scheme, granularity):
    """With 8-bit dynamic activation quantization the folded model feeds the quantizer the same values
    computed by a different float expression (e.g. LN(x)(1+scale')+shift' instead of
    (LN(x)(1+scale)+shift)/s). Those differ by float rounding, which moves the dynamic range by a
    rounding error and can push an element that sits on a rounding boundary to the neighbouring code
    (one step = range/255). So the outputs are not equal to float rounding, but the difference must be
    far below the activation quantization noise itself."""
    act_cfg = ActQuantConfig(bits=8, granularity=granularity, scheme=scheme)
    base = random_dit()
    model = _quantize(copy.deepcopy(base), scheme, act_cfg=act_cfg)
    folded = fold_smoothing(copy.deepcopy(model))
    no_act = copy.deepcopy(model)
    for m in no_act.modules():
        if isinstance(m, QuantLinear):
            m.act_cfg = None
    x, t, y = _inputs()
    ref_blocks, ref = _trace(model, x, t, y)
    got_blocks, got = _trace(folded, x, t, y)
    _, no_act_out = _trace(no_act, x, t, y)
    act_noise = _rel(ref, no_act_out)
    assert act_noise > 0
    assert _rel(got, ref) < 1e-2, _rel(got, ref)
    assert _rel(got, ref) < 0.2 * act_noise, (_rel(got, ref), act_noise)
    for a, b in zip(got_blocks, ref_blocks):
        assert _rel(a, b) < 1e-2


def test_fold_skips_unsmoothed_and_folds_into_plain_linear():
    """Plain nn.Linear layers and QuantLinear without smoothing are skipped; a proj smoothing folds
    into a float qkv as well."""
    model = random_dit()
    _quantize(model, "ditas", act_cfg=None, skip={(0, "attn.qkv"), (1, "mlp.fc1"), (1, "attn.proj")})
    model.blocks[1].mlp.fc2.smooth = None
    ref = copy.deepcopy(model)
    folded = fold_smoothing(model)
    assert isinstance(folded.blocks[0].attn.qkv, nn.Linear) and not isinstance(folded.blocks[0].attn.qkv, QuantLinear)
    x, t, y = _inputs()
    ref_out, got = _trace(ref, x, t, y)[1], _trace(folded, x, t, y)[1]
    torch.testing.assert_close(got, ref_out, rtol=1e-4, atol=1e-5 * float(ref_out.abs().max()))
    # block 1's proj was not smoothed: its qkv V rows stay bit-identical
    torch.testing.assert_close(folded.blocks[1].attn.qkv.weight, ref.blocks[1].attn.qkv.weight, rtol=0, atol=0)
