"""Uniform quantizers: error bounds, hand-computed examples, granularities, packing."""
import pytest
import torch

from quant.method.quantizer import (dequantize_weight, fake_quantize_act, fake_quantize_weight, pack_int4, quantize_act,
                                    quantize_weight, scale_qweight_columns, scale_qweight_rows, unpack_int4)

from quant.quant_config import ActQuantConfig, WeightQuantConfig

torch.set_num_threads(1)


def _outlier_weight(out=64, inp=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[:, [3, inp // 2, inp - 5]] *= 12.0
    return w


def _per_element(t, q):
    """Expand a group tensor (scale or zero) to the weight's shape, independently of the library."""
    out, inp = q.codes.shape
    if q.cfg.scheme == "reference":  # entry [p, j] covers rows p, p + out/32, ... of column j
        return t.repeat(32, 1)
    return t.repeat_interleave(inp // t.shape[-1], dim=-1)


@pytest.mark.parametrize("kwargs", [
    dict(bits=1), dict(bits=9), dict(bits=4.0), dict(group_size=0), dict(scheme="gptq"),
    dict(symmetric=True, scheme="reference"),
])
def test_weight_config_validation(kwargs):
    with pytest.raises(ValueError):
        WeightQuantConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(bits=0), dict(granularity="channel"), dict(scheme="x")])
def test_act_config_validation(kwargs):
    with pytest.raises(ValueError):
        ActQuantConfig(**kwargs)


def test_group_shape_errors():
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight(torch.randn(4, 10), WeightQuantConfig(group_size=4))
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_weight(torch.randn(48, 2), WeightQuantConfig(scheme="reference"))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size,symmetric", [(None, False), (16, False), (None, True), (32, True)])
def test_ditas_weight_error_within_half_step(bits, group_size, symmetric):
    w = _outlier_weight()
    q = quantize_weight(w, WeightQuantConfig(bits=bits, group_size=group_size, symmetric=symmetric))
    assert q.codes.dtype == torch.uint8 and q.codes.shape == w.shape
    assert int(q.codes.max()) <= 2 ** bits - 1
    ng = 1 if group_size is None else 96 // group_size
    assert q.scale.shape == (64, ng) and q.zero.shape == (64, ng)
    step = _per_element(q.scale, q)
    err = (dequantize_weight(q) - w).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all()


@pytest.mark.parametrize("bits", range(2, 9))
def test_reference_weight_error_bounds(bits):
    """scale = range/2^b clips the top of each group: half a step below the top grid point, 1.5 above."""
    w = _outlier_weight()
    q = quantize_weight(w, WeightQuantConfig(bits=bits, scheme="reference"))
    assert q.scale.shape == (2, 96) and int(q.codes.max()) <= 2 ** bits - 1
    step, z = _per_element(q.scale, q), _per_element(q.zero, q)
    err = (dequantize_weight(q) - w).abs()
    top = (2 ** bits - 1 - z) * step
    inside = w <= top + step / 2
    assert (err[inside] <= step[inside] / 2 * (1 + 1e-5) + 1e-7).all()
    assert (err <= 1.5 * step * (1 + 1e-5)).all()
    assert (~inside).any()  # the clipping really happens


def test_ditas_hand_example():
    # one row, 2 bits: steps = 3, scale = (2 - -1)/3 = 1, z = round(1/1) = 1
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0, 1.4, -0.6]])
    q = quantize_weight(w, WeightQuantConfig(bits=2, group_size=None))
    assert torch.equal(q.scale, torch.tensor([[1.0]])) and torch.equal(q.zero, torch.tensor([[1.0]]))
    # codes = clamp(round(w) + 1): round(0.5) = 0 (half to even), round(-0.6) = -1
    assert q.codes.tolist() == [[0, 1, 1, 3, 2, 0]]
    assert torch.equal(dequantize_weight(q), torch.tensor([[-1.0, 0.0, 0.0, 2.0, 1.0, -1.0]]))


def test_reference_hand_example():
    """64 x 2, 2 bits: group (p, j) = rows p, p+2, ..., p+62 of column j (out/32 = 2)."""
    # value -> dequantized value, worked out per group below
    g00 = {-1.0: -1.0, 1.0: 0.5, 0.0: 0.0, 0.3: 0.5, -0.6: -0.5}  # min -1, max 1: scale 2/4 = 0.5,
    #   zero = round(-1/0.5)*0.5 = -1; codes = clamp(round((w+1)/0.5), 0, 3): 1.0 -> 4 -> 3 -> 0.5
    g10 = {0.5: 0.5, 2.5: 2.0, 1.75: 1.5, 1.2: 1.0}  # min 0.5, max 2.5: scale 0.5, zero 0.5;
    #   1.75 -> round(2.5) = 2 (tie to even, as the released round((w - zero)/scale)) -> 1.5
    g01 = {-4.0: -4.0, 0.0: -1.0, -3.1: -3.0, -1.0: -1.0}  # min -4, max 0: scale 1, zero -4; 0 -> 4 -> 3 -> -1
    g11 = {7.0: 7.0}  # constant group: exact
    groups = {(0, 0): g00, (1, 0): g10, (0, 1): g01, (1, 1): g11}
    w = torch.empty(64, 2)
    expected = torch.empty(64, 2)
    for (p, j), table in groups.items():
        values = list(table)
        for r in range(32):
            v = values[r % len(values)]
            w[2 * r + p, j], expected[2 * r + p, j] = v, table[v]
    q = quantize_weight(w, WeightQuantConfig(bits=2, scheme="reference"))
    assert torch.equal(q.scale, torch.tensor([[0.5, 1.0], [0.5, 7.0]]))
    assert torch.equal(dequantize_weight(q), expected)
    # the released formulation: flatten, reshape (32, numel/32), min/max over dim 0
    flat = w.flatten().reshape(32, -1)
    lo, hi = flat.min(0).values, flat.max(0).values
    assert torch.equal(q.scale.flatten()[:3], ((hi - lo) / 4)[:3])


@pytest.mark.parametrize("scheme,group_size", [("ditas", None), ("ditas", 8), ("reference", None)])
def test_constant_groups_are_exact(scheme, group_size):
    w = _outlier_weight(out=64, inp=32)
    if scheme == "reference":  # groups lie in columns
        w[:, 7], w[:, 9] = 0.3, 0.0
        const = w[:, [7, 9]]
    else:                      # groups lie in rows
        w[5], w[6] = -2.5, 0.0
        const = w[[5, 6]]
    wh = fake_quantize_weight(w, WeightQuantConfig(bits=4, group_size=group_size, scheme=scheme))
    assert torch.isfinite(wh).all()
    assert torch.equal(wh[:, [7, 9]] if scheme == "reference" else wh[[5, 6]], const)


def test_reference_commutes_with_column_scaling():
    w = _outlier_weight()
    cfg = WeightQuantConfig(bits=4, scheme="reference")
    g = torch.Generator().manual_seed(1)
    s_pow2 = 2.0 ** torch.randint(-6, 7, (96,), generator=g).float()  # exact in float: bitwise equality
    assert torch.equal(fake_quantize_weight(w * s_pow2, cfg), fake_quantize_weight(w, cfg) * s_pow2)
    s = torch.rand(96, generator=g) * 20 + 0.01
    q = quantize_weight(w, cfg)
    torch.testing.assert_close(fake_quantize_weight(w * s, cfg), dequantize_weight(q) * s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dequantize_weight(scale_qweight_columns(q, s)), dequantize_weight(q) * s)
    with pytest.raises(ValueError):
        scale_qweight_columns(quantize_weight(w, WeightQuantConfig()), s)


def test_ditas_commutes_with_row_scaling():
    w = _outlier_weight()
    cfg = WeightQuantConfig(bits=4, group_size=32)
    r = 2.0 ** torch.randint(-4, 5, (64, 1), generator=torch.Generator().manual_seed(2)).float()
    q = quantize_weight(w, cfg)
    assert torch.equal(fake_quantize_weight(w * r, cfg), dequantize_weight(q) * r)
    torch.testing.assert_close(dequantize_weight(scale_qweight_rows(q, r[:, 0] * 1.3)), dequantize_weight(q) * r * 1.3)


@pytest.mark.parametrize("scheme", ["ditas", "reference"])
def test_stacked_weights_quantize_independently(scheme):
    ws = torch.stack([_outlier_weight(seed=k) for k in range(3)])
    cfg = WeightQuantConfig(bits=3, group_size=32, scheme=scheme)
    q = quantize_weight(ws, cfg)
    for k in range(3):
        qk = quantize_weight(ws[k], cfg)
        assert torch.equal(q[k].codes, qk.codes) and torch.equal(q[k].scale, qk.scale)
        assert torch.equal(dequantize_weight(q)[k], dequantize_weight(qk))


def test_pack_int4_roundtrip():
    codes = torch.randint(0, 16, (3, 5, 8), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (3, 5, 4) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert pack_int4(torch.tensor([1, 2], dtype=torch.uint8)).item() == 0x21  # low nibble first
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([16, 0], dtype=torch.uint8))


def _act(seed=0, shape=(4, 6, 16)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., 5] *= 30.0
    return x


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("granularity", ["tensor", "row", "token"])
def test_act_error_within_half_step(bits, granularity):
    x = _act()
    cfg = ActQuantConfig(bits=bits, granularity=granularity)
    codes, scale, zero = quantize_act(x, cfg)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2 ** bits - 1
    expected_scale_shape = {"tensor": (1, 1, 1), "row": (4, 1, 1), "token": (4, 6, 1)}[granularity]
    assert scale.shape == expected_scale_shape
    xh = fake_quantize_act(x, cfg)
    assert torch.equal(xh, (codes.float() - zero) * scale)
    assert ((xh - x).abs() <= scale / 2 * (1 + 1e-5) + 1e-7).all()


def test_act_hand_examples():
    x = torch.tensor([[-1.0, 3.0, 0.4, 1.5]])
    # ditas, 2 bits: scale 4/3, z = round(0.75) = 1, codes = clamp(round(x*0.75) + 1, 0, 3)
    codes, scale, zero = quantize_act(x, ActQuantConfig(bits=2, scheme="ditas"))
    assert codes.tolist() == [[0, 3, 1, 2]] and zero.item() == 1.0
    torch.testing.assert_close(scale, torch.tensor([[4 / 3]]))
    # reference, 2 bits: scale 4/4 = 1, z = 1, codes = clamp(round(x) + 1, 0, 3): 3 -> 4 -> 3 (clipped)
    ref = fake_quantize_act(x, ActQuantConfig(bits=2, scheme="reference"))
    assert torch.equal(ref, torch.tensor([[-1.0, 2.0, 0.0, 2.0]]))


def test_act_row_granularity_ignores_batch_neighbours():
    x = _act()
    y = x.clone()
    y[1:] *= 7.0
    y[2, 0, 0] = -100.0
    for gran, same in [("row", True), ("token", True), ("tensor", False)]:
        cfg = ActQuantConfig(bits=4, granularity=gran)
        a, b = fake_quantize_act(x, cfg)[0], fake_quantize_act(y, cfg)[0]
        assert torch.equal(a, b) == same, gran
    # a 2-D input's rows are its samples
    x2 = x.reshape(-1, 16)
    torch.testing.assert_close(fake_quantize_act(x2, ActQuantConfig(granularity="row")),
                               fake_quantize_act(x2, ActQuantConfig(granularity="token")))


def test_act_stack_dims_and_constant_and_dtype():
    xs = torch.stack([_act(seed=k) * (k + 1) for k in range(3)])
    for gran in ["tensor", "row", "token"]:
        cfg = ActQuantConfig(bits=4, granularity=gran)
        stacked = fake_quantize_act(xs, cfg, stack_dims=1)
        for k in range(3):
            assert torch.equal(stacked[k], fake_quantize_act(xs[k], cfg))
    const = torch.full((2, 3, 4), -0.7)
    assert torch.equal(fake_quantize_act(const, ActQuantConfig()), const)
    assert torch.equal(fake_quantize_act(torch.zeros(2, 4), ActQuantConfig()), torch.zeros(2, 4))
    xh = fake_quantize_act(_act().half(), ActQuantConfig())
    assert xh.dtype == torch.float16 and torch.isfinite(xh).all()
