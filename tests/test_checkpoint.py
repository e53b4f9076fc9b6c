"""The packed fp16 checkpoint (quant/io/checkpoint.py), round_for_storage, --quantize-adaln and folding
a quantized adaLN linear (quant/method/fold.py)."""
import copy
import json
import os
import struct
from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file

import QuantDiT
from quant.errors import UserError
from helpers import assert_one_line_error, calib_loop, call_main, random_dit
from quant.calibration.driver import quantize_adaln, quantize_dit
from quant.quant_config import QuantConfig
from quant.method.layers import adaln_layers
from quant.io.checkpoint import load_quantized, planned_layers, save_quantized, skeleton
from quant.io.storage import plan_bytes, round_for_storage, storage_plan
from quant.method.fold import fold_smoothing
from quant.method.lora import fit_lora
from quant.nn.qlinear import QuantLinear
from quant.method.quantizer import quantize_weight, unpack_int4
from quant.quant_config import WeightQuantConfig

torch.set_num_threads(1)
META = {"model": "DiT-XS/2", "image_size": 8, "num_classes": 10, "vae": "none", "in_channels": 3}


def _inputs(n=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 10, (n,), generator=g))


CFG = QuantConfig(weight_bit=4, act_bit=8, group_size=32, lora_rank=4, lora_iters=2, smoothing="search",
                  alpha_step=0.25,
                  quantize_adaln=True)


@pytest.fixture(scope="module")
def quantized():
    """(model, report): a calibrated W4A8 DiT-XS/2 with 8-bit adaLN, not yet rounded for storage."""
    model = random_dit()
    return model, quantize_dit(model, CFG, calib_loop(model, 2, 2), progress=False)


def _header_len(path):
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


@pytest.mark.parametrize("storage", ["fp16", "fp32"])
def test_roundtrip_is_exact_and_layout_recorded(quantized, tmp_path, storage):
    model, report = copy.deepcopy(quantized[0]), quantized[1]
    before = copy.deepcopy(model)
    round_for_storage(model, storage)
    x, t, y = _inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        exact = before(x, t, y)
    if storage == "fp32":
        assert torch.equal(ref, exact)  # nothing to round
    else:
        assert not torch.equal(ref, exact)  # fp16 rounding changes the function slightly ...
        torch.testing.assert_close(ref, exact, rtol=0, atol=2e-2 * float(exact.abs().max()))  # ... but little
    out = save_quantized(model, dict(META, **CFG.to_dict()), report, str(tmp_path / "q"), storage_dtype=storage)
    loaded, meta = load_quantized(out)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), ref)
    for key, value in model.state_dict().items():  # the same model, tensor for tensor (all float32 in memory)
        assert torch.equal(loaded.state_dict()[key], value), key

    assert meta["storage_dtype"] == storage and meta["quantize_adaln"] is True
    ada, fc2 = meta["layers"]["blocks.1.adaLN_modulation.1"], meta["layers"]["blocks.1.mlp.fc2"]
    assert ada["weight_bit"] == 8 and ada["group_size"] is None and ada["act"] is None and ada["rank"] == 0
    assert ada["packed_int4"] is False and ada["dtypes"]["codes"] == "uint8"
    assert fc2["packed_int4"] is True and fc2["dtypes"]["codes"] == "uint4x2" and fc2["act"]["bits"] == 8
    assert fc2["dtypes"]["zero"] == "int16"
    f = "fp16" if storage == "fp16" else "fp32"
    assert fc2["dtypes"]["lora_L"] == f and fc2["dtypes"]["bias"] == f
    assert meta["fp_dtypes"]["final_layer.linear.weight"] == f and meta["fp_dtypes"]["pos_embed"] == f
    assert "blocks.0.adaLN_modulation.1.weight" not in meta["fp_dtypes"]

    file = os.path.join(out, "model.safetensors")
    stored = load_file(file)
    assert stored["blocks.1.mlp.fc2.codes"].shape == (64, 128) and stored["blocks.1.mlp.fc2.codes"].dtype == torch.uint8
    assert torch.equal(unpack_int4(stored["blocks.1.mlp.fc2.codes"]), model.blocks[1].mlp.fc2.codes)
    assert stored["blocks.0.adaLN_modulation.1.codes"].shape == (384, 64)
    assert "blocks.0.mlp.fc2.weight" not in stored and "blocks.0.adaLN_modulation.1.weight" not in stored
    assert stored["blocks.0.mlp.fc2.zero"].dtype == torch.int16
    # the layout formula is the file: payload bytes + safetensors' 8-byte length + JSON header
    plan = storage_plan(model, storage)
    assert {k: s.dtype for k, s in plan.items()} == {k: _name(v.dtype) for k, v in stored.items()} | {
        k: "uint4x2" for k, s in plan.items() if s.dtype == "uint4x2"}
    assert meta["payload_bytes"] == plan_bytes(plan) == sum(v.numel() * v.element_size() for v in stored.values())
    assert os.path.getsize(file) == 8 + _header_len(file) + plan_bytes(plan)
    # ... and the shapes-only plan of a meta-device skeleton (what bench/ckpt_size.py uses) agrees
    nominal = storage_plan(skeleton(META, planned_layers(random_dit(), CFG)), storage)
    assert nominal == plan


def _name(dtype):
    return {torch.float16: "fp16", torch.float32: "fp32", torch.int16: "int16", torch.uint8: "uint8"}[dtype]


def test_save_rounds_in_place_and_is_idempotent(quantized, tmp_path):
    model = copy.deepcopy(quantized[0])
    x, t, y = _inputs()
    save_quantized(model, dict(META, **CFG.to_dict()), {}, str(tmp_path / "q"))  # rounds `model` in place
    with torch.no_grad():
        ref = model(x, t, y)
        assert torch.equal(load_quantized(str(tmp_path / "q"))[0](x, t, y), ref)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    round_for_storage(model, "fp16")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    qkv = model.blocks[0].attn.qkv  # the dequantized weight follows the rounded scales
    assert torch.equal(qkv.weight, (qkv.codes.float().view(192, 2, 32) - qkv.zero[..., None])
                       .mul(qkv.scale[..., None]).view(192, 64))


def test_fp16_fallbacks_are_recorded(tmp_path):
    """Values fp16 cannot hold keep fp32 (per tensor), and the loaded model is still exact."""
    model = random_dit()
    g = torch.Generator().manual_seed(0)
    for block in model.blocks:
        for parent, attr in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "fc1"), (block.mlp, "fc2")):
            lin = getattr(parent, attr)
            s = torch.exp(torch.randn(lin.in_features, generator=g))
            fit = fit_lora(lin.weight.detach() * s, partial(quantize_weight, cfg=WeightQuantConfig(4, 32)), 4, 2)
            setattr(parent, attr, QuantLinear(fit.qweight, lin.bias.detach(), fit.L, fit.R, smooth=s))
    qkv, fc1, proj = model.blocks[0].attn.qkv, model.blocks[0].mlp.fc1, model.blocks[1].attn.proj
    qkv.scale[0, 0] = 1e-6            # a group scale below fp16's normal range
    fc1.zero[0, 0] = 0.5              # a non-integer zero point
    proj.smooth[3] = 1e5              # a smoothing factor fp16 cannot hold
    with torch.no_grad():
        model.final_layer.linear.weight[0, 0] = 7e4  # an FP weight that overflows fp16
    qkv.recompute_weight()
    fc1.recompute_weight()
    round_for_storage(model, "fp16")
    assert qkv.scale[0, 0] == 1e-6 and model.final_layer.linear.weight[0, 0] == 7e4
    out = save_quantized(model, dict(META, scheme="ditas", weight_bit=4, act_bit=8, act_granularity="row",
                                     group_size=32), {}, str(tmp_path / "q"))
    meta = json.loads(open(os.path.join(out, "quant_config.json")).read())
    assert meta["layers"]["blocks.0.attn.qkv"]["dtypes"]["scale"] == "fp32"
    assert meta["layers"]["blocks.0.attn.qkv"]["dtypes"]["lora_L"] == "fp16"
    assert meta["layers"]["blocks.0.mlp.fc1"]["dtypes"]["zero"] == "fp32"
    assert meta["layers"]["blocks.1.mlp.fc1"]["dtypes"]["zero"] == "int16"
    assert meta["layers"]["blocks.1.attn.proj"]["dtypes"]["smooth"] == "fp32"
    assert meta["fp_dtypes"]["final_layer.linear.weight"] == "fp32"
    assert meta["fp_dtypes"]["final_layer.linear.bias"] == "fp16"
    loaded = load_quantized(out)[0]
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


def _corrupt(path, key, fn):
    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    if fn is None:
        del state[key]
    else:
        state[key] = fn(state[key])
    save_file(state, file)


def _one_line_error(path):
    from ditas import cli
    code = 0
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        try:
            cli.run(lambda _: load_quantized(path), None)
        except SystemExit as e:
            code = e.code
    return code, buf.getvalue()


@pytest.mark.parametrize("key,fn,fragment", [
    ("blocks.0.mlp.fc2.codes", lambda c: unpack_int4(c), "has shape (64, 256), the config says (64, 128)"),
    ("blocks.0.mlp.fc2.codes", lambda c: c[:, :-1].contiguous(), "the config says (64, 128)"),
    ("blocks.1.adaLN_modulation.1.codes", lambda c: c[:, :32].contiguous(), "the config says (384, 64)"),
    ("blocks.0.attn.qkv.scale", lambda s: s.float(), "is fp32, the config says fp16"),
    ("blocks.0.attn.qkv.zero", lambda z: z.float(), "is fp32, the config says int16"),
    ("blocks.0.attn.qkv.lora_R", None, "lacks blocks.0.attn.qkv.lora_R"),
    ("t_embedder.mlp.0.weight", lambda w: w[:, :-1].contiguous(), "t_embedder.mlp.0.weight has shape"),
])
def test_mismatched_checkpoint_is_one_line_user_error(quantized, tmp_path, key, fn, fragment):
    out = save_quantized(copy.deepcopy(quantized[0]), dict(META, **CFG.to_dict()), {}, str(tmp_path / "q"))
    _corrupt(out, key, fn)
    with pytest.raises(UserError):
        load_quantized(out)
    assert_one_line_error(*_one_line_error(out), fragment)


def test_config_layout_mismatch_is_one_line_user_error(quantized, tmp_path):
    out = save_quantized(copy.deepcopy(quantized[0]), dict(META, **CFG.to_dict()), {}, str(tmp_path / "q"))
    cfg_path = os.path.join(out, "quant_config.json")
    meta = json.loads(open(cfg_path).read())
    meta["quantize_adaln"] = False  # the adaLN layers are then unexpected
    open(cfg_path, "w").write(json.dumps(meta))
    assert_one_line_error(*_one_line_error(out), "its layers do not match DiT-XS/2")
    meta["quantize_adaln"] = True
    meta["layers"]["blocks.0.mlp.fc1"]["weight_bit"] = 8  # 8-bit codes would be unpacked: (256, 64)
    open(cfg_path, "w").write(json.dumps(meta))
    assert_one_line_error(*_one_line_error(out), "blocks.0.mlp.fc1.codes has shape (256, 32), the config says (256, 64)")


@pytest.mark.parametrize("scheme", ["ditas", "reference"])
def test_fold_with_quantized_adaln_is_exact_without_act_quant(scheme):
    """Folding qkv/fc1 smoothing into a weight-only 8-bit adaLN QuantLinear rescales its row scales."""
    model = random_dit()
    g = torch.Generator().manual_seed(1)
    wcfg = WeightQuantConfig(bits=4, group_size=32 if scheme == "ditas" else None, scheme=scheme)
    for block in model.blocks:
        for parent, attr in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "fc1"), (block.mlp, "fc2")):
            lin = getattr(parent, attr)
            s = torch.exp(torch.randn(lin.in_features, generator=g) * 0.8)
            fit = fit_lora(lin.weight.detach() * s, partial(quantize_weight, cfg=wcfg), rank=4, iters=2)
            setattr(parent, attr, QuantLinear(fit.qweight, lin.bias.detach(), fit.L, fit.R, smooth=s, act_cfg=None))
    report = quantize_adaln(model)
    assert set(report) == set(adaln_layers(model)) and all(r["weight_rel_error"] < 1e-2 for r in report.values())
    before = [(b.adaLN_modulation[1].codes.clone(), b.adaLN_modulation[1].scale.clone(), b.attn.qkv.smooth.clone(),
               b.mlp.fc1.smooth.clone()) for b in model.blocks]
    folded = fold_smoothing(copy.deepcopy(model))
    x, t, y = _inputs()
    with torch.no_grad():
        ref, got = model(x, t, y), folded(x, t, y)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    for block, (codes, scale, s_qkv, s_fc1) in zip(folded.blocks, before):
        ada, d = block.adaLN_modulation[1], block.attn.qkv.in_features
        assert isinstance(ada, QuantLinear) and ada.act_cfg is None
        assert torch.equal(ada.codes, codes) and not getattr(ada, "fake_quant_only", False)
        expected = scale.clone()
        for chunk, s in ((0, s_qkv), (1, s_qkv), (3, s_fc1), (4, s_fc1)):
            expected[chunk * d:(chunk + 1) * d] /= s[:, None]
        torch.testing.assert_close(ada.scale, expected)
        torch.testing.assert_close(ada.scale[2 * d:3 * d], scale[2 * d:3 * d], rtol=0, atol=0)  # gates untouched


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "xs.pt"
    torch.save(random_dit(std=0.05).state_dict(), path)
    return str(path)


def test_quantdit_cli_quantize_adaln_and_storage_dtype(tiny_ckpt, tmp_path):
    flags = ["--model", "DiT-XS/2", "--image-size", "8", "--num-classes", "10", "--vae", "none",
             "--num-sampling-steps", "2", "--calib-labels", "0", "1", "--group-size", "32", "--lora-rank", "2",
             "--lora-iters", "1", "--smoothing", "search", "--alpha-step", "0.5", "--no-preview", "--ckpt", tiny_ckpt,
             "--results-dir", str(tmp_path)]
    out = QuantDiT.main(QuantDiT.build_parser().parse_args(flags + ["--quantize-adaln", "--storage-dtype", "fp32"]))
    assert os.path.basename(out) == "DiT-XS-2-8-W4A8-ditas-search-r2-adaln8-fp32"
    meta = json.loads(open(os.path.join(out, "quant_config.json")).read())
    assert meta["quantize_adaln"] is True and meta["storage_dtype"] == "fp32" and len(meta["layers"]) == 10
    report = json.loads(open(os.path.join(out, "report.json")).read())
    assert set(report["adaln_layers"]) == {"blocks.0.adaLN_modulation.1", "blocks.1.adaLN_modulation.1"}
    model = load_quantized(out)[0]
    assert isinstance(model.blocks[1].adaLN_modulation[1], QuantLinear)
    assert not isinstance(model.final_layer.adaLN_modulation[1], QuantLinear)
    code, err = call_main(QuantDiT, *flags, "--storage-dtype", "bf16")
    assert_one_line_error(code, err, "invalid choice")
