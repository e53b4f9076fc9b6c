"""The fast search loss is the direct evaluation to float rounding (issue 31): on every layer kind of the bundled
model and of DiT-XL/2-shaped layers, for both schemes, on every loss path that runs on the CPU (torch ops in
float32, the fused integer kernel of the ditas candidates, the fused bf16 kernel of the reference scheme). The
CUDA path is the same torch ops; no Triton kernel computes a loss."""
from dataclasses import replace

import pytest
import torch

from quant.kernels import ops_avx512
from quant.method.quantizer import dequantize_weight, fake_quantize_act
from quant.quant_config import ActQuantConfig, WeightQuantConfig
from quant.search.candidates import Candidates
from quant.quant_config import alpha_grid
from quant.search.losses import LossEngine
from quant.method.smoothing import RunningAbsMax

torch.set_num_threads(1)
KINDS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
XL = 1152  # DiT-XL/2's hidden size
XL_SHAPES = {"attn.qkv": (3 * XL, XL), "attn.proj": (XL, XL), "mlp.fc1": (4 * XL, XL), "mlp.fc2": (XL, 4 * XL)}
CONFIGS = {"reference": (WeightQuantConfig(bits=4, group_size=None, scheme="reference"),
                         ActQuantConfig(bits=8, granularity="tensor", scheme="reference")),
           "ditas": (WeightQuantConfig(bits=4, group_size=128, scheme="ditas"),
                     ActQuantConfig(bits=8, granularity="row", scheme="ditas"))}
ALPHAS = alpha_grid(0.25) + [None]


@pytest.fixture(scope="module")
def bundled_inputs():
    """{kind: (weight, bias, [inputs of 3 DDPM steps])} of the bundled model's block 2."""
    from test_bundled import bundled_model
    from diffusion.sampling import make_sampler, sample_inputs
    model = bundled_model()
    block = model.blocks[2]
    layers = {kind: block.get_submodule(kind) for kind in KINDS}
    xs = {kind: [] for kind in KINDS}
    hooks = [m.register_forward_hook(lambda m, i, o, kind=kind: xs[kind].append(i[0].detach().clone()))
             for kind, m in layers.items()]
    gens, y, z = sample_inputs(1, range(4), 10, (3, 16, 16), [0, 3, 5, 8])
    with torch.no_grad():
        make_sampler(model, 3, 1.5, clip_denoised=True)(z, y, gens)
    for h in hooks:
        h.remove()
    return {kind: (m.weight.detach(), m.bias.detach(), xs[kind]) for kind, m in layers.items()}


def xl_layer(kind, rows=256):
    """A DiT-XL/2-shaped layer with random weights, two steps of `rows` input rows with outlier channels."""
    out, inp = XL_SHAPES[kind]
    g = torch.Generator().manual_seed(KINDS.index(kind))
    w, b = torch.randn(out, inp, generator=g) * 0.02, torch.randn(out, generator=g) * 0.01
    scale = torch.exp(torch.randn(inp, generator=g))
    return w, b, [torch.randn(2, rows // 2, inp, generator=g) * scale for _ in range(2)]


def candidates(scheme, w, b, xs):
    wcfg, _ = CONFIGS[scheme]
    a = RunningAbsMax()
    for x in xs:
        a.update(x)
    return Candidates(w, b, a.value, ALPHAS, wcfg, lora_rank=32, lora_iters=2, scheme=scheme, svd="subspace")


def summed(cands, xs, **engine):
    e = LossEngine(CONFIGS[cands.scheme][1], **engine).attach(cands)
    return sum(e.losses(x) for x in xs), e


def float64_losses(cands, xs):
    """Every candidate's summed mean squared error in float64: the quantizer's activations, the exact values of the
    stored codes, scales and LoRA factors, and the FP layer's output in float64."""
    act_cfg = CONFIGS[cands.scheme][1]
    out = torch.zeros(len(ALPHAS), dtype=torch.float64)
    for k in range(len(ALPHAS)):
        s = cands.smooth[k]
        if cands.scheme == "reference":  # Q diag(s) + L R diag(s), with Q + L R exact
            wk = cands.effective(torch.float64) * s.double()
        else:
            q, (L, R) = cands.qweight(k), cands.lora(k)
            wk = dequantize_weight(replace(q, scale=q.scale.double())) + L.double() @ R.double()
        for x in xs:
            xq = fake_quantize_act(x / s, act_cfg).double()
            out[k] += ((xq @ wk.T - x.double() @ cands.weight.double().T) ** 2).mean()
    return out


def assert_exact(cands, xs, monkeypatch):
    """The fast loss on each CPU path within 1e-6 of the direct evaluation, and of the float64 evaluation."""
    naive, _ = summed(cands, xs, impl="naive")
    exact = float64_losses(cands, xs)
    torch.testing.assert_close(naive, exact, rtol=1e-6, atol=0)  # the released formula's own float32 rounding
    fast, engine = summed(cands, xs)
    paths = {"fast": fast}
    if cands.scheme == "ditas":
        assert engine._kernel_ready(xs[0].reshape(-1, xs[0].shape[-1])) == (ops_avx512.load() is not None)
        with monkeypatch.context() as m:  # the dequantized float32 products
            m.setattr(LossEngine, "_kernel_ready", lambda self, x2: False)
            paths["dequantized"] = summed(cands, xs)[0]
    else:
        assert engine.shared
    for name, losses in paths.items():
        torch.testing.assert_close(losses, naive, rtol=1e-6, atol=0, msg=lambda m: f"{name} vs naive: {m}")
        torch.testing.assert_close(losses, exact, rtol=3e-7, atol=0, msg=lambda m: f"{name} vs float64: {m}")


@pytest.mark.parametrize("scheme", ["reference", "ditas"])
@pytest.mark.parametrize("kind", KINDS)
def test_fast_loss_is_direct_evaluation_on_bundled_model(bundled_inputs, monkeypatch, scheme, kind):
    w, b, xs = bundled_inputs[kind]
    assert_exact(candidates(scheme, w, b, xs), xs, monkeypatch)


@pytest.mark.parametrize("scheme", ["reference", "ditas"])
@pytest.mark.parametrize("kind", KINDS)
def test_fast_loss_is_direct_evaluation_at_dit_xl_shapes(monkeypatch, scheme, kind):
    """256 rows of a DiT-XL/2 layer: a float32 sum of the constant over a step's rows ran ~1e-4 low here."""
    w, b, xs = xl_layer(kind)
    assert_exact(candidates(scheme, w, b, xs), xs, monkeypatch)


def bf16_operand_losses(engine, xs):
    """What the fused bf16 kernel evaluates, in float64: ||bf16(E_k) M (+ P)||^2 (+ 2 <E_k, X N M^T>) + ||X F||^2,
    E_k = fq(x/s_k) s_k - x from the quantizer, on the engine's own float32 / bf16 operands."""
    ops, cands = engine.ops, engine.c
    m = ops["m"].double()
    out = torch.zeros(len(ALPHAS), dtype=torch.float64)
    for x in xs:
        x2 = x.reshape(-1, x.shape[-1])
        xm = x2.double() @ ops["xmul"].double()
        partner, const = xm[:, :ops["const_from"]], xm[:, ops["const_from"]:].pow(2).sum()
        for k in range(len(ALPHAS)):
            s = cands.smooth[k]
            e = fake_quantize_act(x / s, engine.act_cfg).reshape(x2.shape) * s - x2
            z = e.bfloat16().double() @ m
            loss = z.pow(2).sum() + 2 * (e.double() * partner).sum() if ops["split"] else (z + partner).pow(2).sum()
            out[k] += (loss + const) / (x2.shape[0] * cands.weight.shape[0])
    return out


@pytest.mark.skipif(not ops_avx512.bf16_ok(), reason="fused bf16 search kernel not available here")
@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_bf16_kernel_is_its_float64_evaluation(bundled_inputs, granularity, kind):
    """The reference scheme's fused bf16 kernel (matmul_dtype="bf16") computes its bf16 products' loss to float
    rounding: no term summed at a lower precision (the bf16 products themselves move a loss by ~1e-5)."""
    w, b, xs = bundled_inputs[kind]
    cands = candidates("reference", w, b, xs)
    act_cfg = replace(CONFIGS["reference"][1], granularity=granularity)
    engine = LossEngine(act_cfg, matmul_dtype="bf16").attach(cands)
    assert "m_packed" in engine.ops
    fused = sum(engine.losses(x) for x in xs)
    torch.testing.assert_close(fused, bf16_operand_losses(engine, xs), rtol=1e-6, atol=0)
