"""QuantDiT.py and the calibrate -> checkpoint -> load path, on a tiny random DiT."""
import json
import os

import pytest
import torch

import QuantDiT
from helpers import assert_one_line_error, assert_user_error, calib_loop, call_main, run_script
from models import DiT_models
from quant.calibration.driver import quantize_dit
from quant.quant_config import QuantConfig
from quant.method.layers import quantizable_layers
from quant.io.checkpoint import load_quantized, save_quantized
from quant.io.storage import round_for_storage
from quant.nn.qlinear import QuantLinear


def tiny_model(seed=0, depth_name="DiT-XS/2"):
    torch.manual_seed(seed)
    m = DiT_models[depth_name](input_size=8, in_channels=3, num_classes=10)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n != "pos_embed":
                p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "xs.pt"
    torch.save(tiny_model().state_dict(), path)
    return str(path)


TINY = ["--model", "DiT-XS/2", "--image-size", "8", "--num-classes", "10", "--vae", "none",
        "--num-sampling-steps", "3", "--calib-labels", "0", "1", "2", "3", "--group-size", "32",
        "--lora-rank", "4", "--lora-iters", "3"]


def test_every_layer_gets_an_alpha_and_checkpoint_roundtrips(tmp_path):
    model = tiny_model()
    x = torch.randn(4, 3, 8, 8)
    t = torch.tensor([1, 200, 500, 999])
    y = torch.tensor([0, 1, 2, 10])
    cfg = QuantConfig(weight_bit=4, act_bit=8, group_size=32, lora_rank=4, lora_iters=3, smoothing="search")
    report = quantize_dit(model, cfg, calib_loop(model, 3, 4), progress=False)
    names = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert list(report["layers"]) == names
    for name in names:
        r = report["layers"][name]
        assert r["alpha"] in [round(k * 0.05, 10) for k in range(21)]
        # the default shortlist: every alpha predicted, the 2 best predicted scored exactly, the best scored wins
        predicted = r["search_losses_predicted"]
        assert len(predicted) == 21 and sorted(r["search_losses"]) == sorted(sorted(predicted, key=predicted.get)[:2])
        assert r["output_error"] == min(r["search_losses"].values())
        assert r["weight_error_after_lora"] < r["weight_error_before_lora"]
        assert isinstance(model.get_submodule(name), QuantLinear)
    round_for_storage(model, "fp16")  # the model is now exactly what the checkpoint stores
    with torch.no_grad():
        ref = model(x, t, y)
    meta = {"model": "DiT-XS/2", "image_size": 8, "num_classes": 10, "vae": "none", "in_channels": 3,
            **cfg.to_dict()}
    out = save_quantized(model, meta, report, str(tmp_path / "q"))
    assert sorted(os.listdir(out)) == ["model.safetensors", "quant_config.json", "report.json"]
    loaded, meta2 = load_quantized(out)
    assert meta2["layers"]["blocks.1.mlp.fc2"]["packed_int4"] is True
    with torch.no_grad():
        again = loaded(x, t, y)
    assert torch.equal(ref, again)


def test_8bit_weights_beat_4bit(tmp_path):
    errs = {}
    for bits in (4, 8):
        model = tiny_model()
        cfg = QuantConfig(weight_bit=bits, act_bit=8, group_size=32, lora_rank=0, smoothing="fixed", alpha=0.5)
        report = quantize_dit(model, cfg, calib_loop(model, 3, 4), progress=False)
        errs[bits] = sum(r["output_error"] for r in report["layers"].values())
    assert errs[8] < errs[4] / 4, errs


def test_lora_and_search_reduce_output_error():
    model = tiny_model()
    report = quantize_dit(model, QuantConfig(group_size=32, lora_rank=8, lora_iters=4), calib_loop(model, 3, 4),
                          progress=False)["layers"]
    better = sum(r["output_error"] < r["output_error_rtn"] for r in report.values())
    assert better == len(report)  # searched alpha + LoRA never worse than plain RTN on the calibration data


def test_reference_scheme_uses_first_steps_only():
    model = tiny_model()
    cfg = QuantConfig(scheme="reference", act_granularity="tensor", lora_rank=4, lora_iters=2, search_steps=2,
                      group_size=None)
    report = quantize_dit(model, cfg, calib_loop(model, 4, 4), progress=False)["layers"]
    assert all(r["search_steps"] == 2 for r in report.values())


def test_search_row_stride_scores_fewer_rows_same_layers():
    """--search-row-stride 2: half the rows scored; the losses estimate the exact ones, alphas stay on the grid."""
    reports = {}
    for stride in (1, 2):
        model = tiny_model()
        cfg = QuantConfig(scheme="reference", act_granularity="tensor", group_size=None, lora_rank=4, lora_iters=2,
                          search_row_stride=stride)
        reports[stride] = quantize_dit(model, cfg, calib_loop(model, 3, 4), progress=False)["layers"]
        assert all(isinstance(m, QuantLinear) for m in quantizable_layers(model).values())
    exact, strided = reports[1], reports[2]
    assert exact.keys() == strided.keys()
    differ = 0
    for name in exact:
        e, s = exact[name]["search_losses"], strided[name]["search_losses"]
        assert e.keys() == s.keys() and strided[name]["alpha"] in [float(a) for a in s]
        differ += any(abs(s[a] - e[a]) > 1e-6 * e[a] for a in e)
        assert all(0.2 < s[a] / e[a] < 5 for a in e)
    assert differ == len(exact)  # every layer scored a different (sub)set of rows


def test_quantdit_cli_writes_complete_directory(tiny_ckpt, tmp_path):
    out = tmp_path / "q"
    proc = run_script("QuantDiT.py", *TINY, "--ckpt", tiny_ckpt, "--out", out, "--weight-bit", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["model.safetensors", "quant_config.json", "report.json", "samples.png"]
    meta = json.loads((out / "quant_config.json").read_text())
    assert meta["weight_bit"] == 8 and meta["act_bit"] == 8 and meta["group_size"] == 32
    assert meta["act_granularity"] == "row" and meta["lora_rank"] == 4
    assert len(meta["alphas"]) == 8
    report = json.loads((out / "report.json").read_text())
    assert set(report["timings"]) >= {"tas_statistics_s", "alpha_search_s", "total_s"}
    # refuses to overwrite
    again = run_script("QuantDiT.py", *TINY, "--ckpt", tiny_ckpt, "--out", out)
    assert_user_error(again, "already holds a quantized checkpoint")


@pytest.mark.parametrize("flags,fragment", [
    (["--weight-bit", "9"], "bits must be an integer in 2..8"),
    (["--act-bit", "1"], "bits must be an integer in 2..8"),
    (["--group-size", "24"], "does not divide the input width"),
    (["--scheme", "fancy"], "invalid choice"),
    (["--alpha", "1.5"], "alpha must be in [0, 1]"),
    (["--lora-rank", "100"], "exceeds min(in, out)"),
    (["--model", "DiT-Q/2"], "unknown model"),
    (["--image-size", "16"], "has shape"),
    (["--calib-labels", "10"], "labels must lie in"),
    (["--calib-samples", "0"], "--calib-samples must be a positive integer"),
    (["--calib-samples", "6", "--calib-chunks", "4"], "--calib-chunks 4: must divide the 6"),
    (["--search-row-stride", "0"], "row stride must be a positive integer"),
    (["--search-row-stride", "2", "--search", "approx"], "applies to the scoring pass"),
    (["--search-shortlist", "3", "--search", "exact"], "applies to --search shortlist only"),
    (["--search-shortlist", "0", "--smoothing", "search"], "positive number of candidates"),
    (["--search", "shortlist", "--alpha", "0.5"], "needs --smoothing search"),
    (["--calib-clip", "yes"], "invalid choice"),
    (["--alpha-step", "0.1"], "--alpha-step sets the searched alpha grid: it needs --smoothing search"),
])
def test_quantdit_bad_input(tiny_ckpt, tmp_path, flags, fragment):
    out = tmp_path / "q"
    code, err = call_main(QuantDiT, *TINY, "--ckpt", tiny_ckpt, "--out", out, *flags)
    assert_one_line_error(code, err, fragment)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith("q")]


def test_quantdit_missing_checkpoint(tmp_path):
    code, err = call_main(QuantDiT, *TINY, "--ckpt", tmp_path / "nope.pt", "--out", tmp_path / "q")
    assert_one_line_error(code, err, "not found")


@pytest.mark.parametrize("flags,kwargs", [
    ([], {}),
    (["--scheme", "reference"], {"scheme": "reference"}),
    (["--weight-bit", "8", "--act-bit", "6"], {"weight_bit": 8, "act_bit": 6}),
    (["--group-size", "0"], {"group_size": None}),
    (["--smoothing", "none"], {"smoothing": "none"}),
    (["--alpha", "0.3"], {"alpha": 0.3}),
    (["--scheme", "reference", "--alpha", "0.3"], {"scheme": "reference", "alpha": 0.3}),
    (["--smoothing", "fixed"], {"smoothing": "fixed"}),
    (["--lora-rank", "0"], {"lora_rank": 0}),
    (["--act-granularity", "token"], {"act_granularity": "token"}),
    (["--scheme", "reference", "--act-granularity", "row"], {"scheme": "reference", "act_granularity": "row"}),
    (["--scheme", "reference", "--search-steps", "7"], {"scheme": "reference", "search_steps": 7}),
    (["--search", "approx"], {"search": "approx"}),
    (["--scheme", "reference", "--search", "approx"], {"scheme": "reference", "search": "approx"}),
    (["--scheme", "reference", "--search-dtype", "bf16", "--search-row-stride", "2"],
     {"scheme": "reference", "search_dtype": "bf16", "search_row_stride": 2}),
    (["--quantize-adaln", "--svd", "lowrank", "--lora-iters", "3", "--smoothing", "search", "--alpha-step", "0.1"],
     {"quantize_adaln": True, "svd": "lowrank", "lora_iters": 3, "smoothing": "search", "alpha_step": 0.1}),
    (["--svd", "full"], {"svd": "full"}),
    (["--scheme", "reference", "--svd", "subspace"], {"scheme": "reference", "svd": "subspace"}),
    (["--calib-clip", "off"], {"calib_clip": "off"}),
    (["--scheme", "reference", "--calib-clip", "auto"], {"scheme": "reference", "calib_clip": "auto"}),
])
def test_cli_and_python_api_build_equal_configs(flags, kwargs):
    """QuantConfig(**kwargs) from Python is exactly what QuantDiT.py builds from the same flags."""
    args = QuantDiT.build_parser().parse_args(flags)
    assert QuantDiT.quant_config_from_args(args) == QuantConfig(**kwargs)


def test_scheme_defaults_resolve_in_quant_config():
    ref = QuantConfig(scheme="reference")
    assert (ref.act_granularity, ref.search_steps, ref.smoothing, ref.alpha) == ("tensor", 50, "search", 0.5)
    ditas = QuantConfig()
    assert (ditas.act_granularity, ditas.search_steps, ditas.svd) == ("row", None, "subspace")
    assert ref.svd == "full" and QuantConfig(svd="full").changed() == {"svd": "full"}
    assert QuantConfig(alpha=0.25).smoothing == "fixed"
    assert QuantConfig(scheme="reference", search_steps=None).search_steps is None  # all steps, explicitly
    assert QuantConfig(scheme="reference", act_granularity="tensor").changed() == {}
    assert QuantConfig(scheme="reference", act_granularity="row").changed() == {"act_granularity": "row"}
    assert (ditas.calib_clip, ref.calib_clip) == ("auto", "off")
    assert QuantConfig(scheme="reference", calib_clip="on").changed() == {"calib_clip": "on"}


@pytest.mark.parametrize("calib_clip,pixel,latent", [("auto", True, False), ("on", True, True), ("off", False, False)])
def test_calib_clip_resolves_per_model_space(calib_clip, pixel, latent):
    cfg = QuantConfig(calib_clip=calib_clip)
    assert (cfg.clips_x0(pixel_space=True), cfg.clips_x0(pixel_space=False)) == (pixel, latent)


def test_calib_clip_checked():
    with pytest.raises(ValueError, match="calib clip must be one of"):
        QuantConfig(calib_clip=True)


@pytest.mark.parametrize("flags,clip", [([], True), (["--scheme", "reference"], False),
                                        (["--scheme", "reference", "--calib-clip", "on"], True)])
def test_calibration_loop_clips_as_configured(tiny_ckpt, tmp_path, monkeypatch, flags, clip):
    """The FP calibration loops clip x0 as --calib-clip (or the scheme's default) says for this pixel-space model;
    the preview samples as sample.py does (clipped); the checkpoint records both the setting and the outcome."""
    seen = []
    from quant.calibration import loop
    lockstep, single = loop.make_lockstep_sampler, QuantDiT.make_sampler
    monkeypatch.setattr(loop, "make_lockstep_sampler",
                        lambda *a, clip_denoised: seen.append(("calib", clip_denoised)) or
                        lockstep(*a, clip_denoised=clip_denoised))
    monkeypatch.setattr(QuantDiT, "make_sampler", lambda *a, clip_denoised: seen.append(("preview", clip_denoised))
                        or single(*a, clip_denoised=clip_denoised))
    out = tmp_path / "q"
    code, err = call_main(QuantDiT, *TINY, "--ckpt", tiny_ckpt, "--out", out, "--alpha", "0.5", *flags)
    assert code == 0, err
    assert seen == [("calib", clip), ("preview", True)]
    meta = json.loads((out / "quant_config.json").read_text())
    assert meta["calib_clip_x0"] is clip
    assert meta["calib_clip"] == (flags[-1] if "--calib-clip" in flags else "off" if flags else "auto")


def test_default_out_dir_names_the_svd():
    def out_dir(*flags):
        args = QuantDiT.build_parser().parse_args(list(flags))
        return QuantDiT.default_out_dir(args, QuantDiT.quant_config_from_args(args))
    assert out_dir() == os.path.join("results", "DiT-XL-2-256-W4A8-ditas")
    assert out_dir("--svd", "full") == os.path.join("results", "DiT-XL-2-256-W4A8-ditas-fullsvd")
    assert out_dir("--scheme", "reference") == os.path.join("results", "DiT-XL-2-256-W4A8-reference")
    assert out_dir("--calib-clip", "off") == os.path.join("results", "DiT-XL-2-256-W4A8-ditas-clipoff")
    assert out_dir("--scheme", "reference", "--calib-clip", "off") == os.path.join("results",
                                                                                  "DiT-XL-2-256-W4A8-reference")


def test_calib_labels_cycle_to_the_sample_count():
    from config import IMAGENET_CALIB_LABELS, calib_labels
    assert calib_labels(10) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5]  # the former default, unchanged
    assert calib_labels(10, 24)[16:] == [6, 7, 8, 9, 0, 1, 2, 3]
    assert calib_labels(1000) == list(IMAGENET_CALIB_LABELS)
    assert calib_labels(1000, 64) == 4 * list(IMAGENET_CALIB_LABELS)  # each released class with 4 noise draws
    assert calib_labels(10, 5, given=[3, 7]) == [3, 7, 3, 7, 3]


def without_calib_labels(flags):
    i = flags.index("--calib-labels")
    return flags[:i] + flags[i + 5:]


@pytest.mark.parametrize("flags,labels,chunks", [
    ([], [i % 10 for i in range(16)], 1),                          # the released batch's size
    (["--calib-samples", "64"], [i % 10 for i in range(64)], 1),   # one chunk unless --calib-chunks
    (["--calib-labels", "3", "5"], [3, 5], 1),                      # given labels: as given
    (["--calib-labels", "3", "5", "--calib-samples", "6", "--calib-chunks", "3"], [3, 5] * 3, 3),
])
def test_calibration_set_defaults_per_scheme(tiny_ckpt, tmp_path, flags, labels, chunks):
    base = without_calib_labels(TINY)
    out = tmp_path / "q"
    code, err = call_main(QuantDiT, *base, "--ckpt", tiny_ckpt, "--out", out, "--no-preview", "--num-sampling-steps",
                          "2", "--alpha", "0.5", *flags)
    assert code == 0, err
    meta = json.loads((out / "quant_config.json").read_text())
    assert (meta["calib_labels"], meta["calib_chunks"]) == (labels, chunks)


def test_calib_samples_16_is_the_former_default(tiny_ckpt, tmp_path):
    """--calib-samples 16 writes the bytes of the former default (16 labels cycled over the classes, one chunk
    given explicitly): the new option costs nothing at its default."""
    base = without_calib_labels(TINY)
    old = [str(i % 10) for i in range(16)]
    for name, flags in (("new", ["--calib-samples", "16"]), ("old", ["--calib-labels", *old, "--calib-chunks", "1"])):
        code, err = call_main(QuantDiT, *base, "--ckpt", tiny_ckpt, "--out", tmp_path / name, "--no-preview",
                              "--num-sampling-steps", "2", *flags)
        assert code == 0, err
    new, old = ((tmp_path / d / "model.safetensors").read_bytes() for d in ("new", "old"))
    assert new == old
