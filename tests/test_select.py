"""Smoothing select (quant/calibration/select.py, QuantConfig.smoothing="select", --smoothing select), on tiny random
DiTs: the option kept is the one whose quantized calibration loop ends nearest the FP loop, and it is exactly what
quantizing with that option alone gives."""
import copy
import json

import pytest
import torch

import QuantDiT
from helpers import assert_one_line_error, call_main, random_dit, run_script
from quant.calibration.driver import quantize_dit
from quant.calibration.feed import ChunkedLoop
from quant.calibration.loop import fp_calibration_loop
from quant.calibration.select import end_to_end_psnr, final_samples, swapped
from quant.method.layers import quantizable_layers
from quant.quant_config import QuantConfig

CFG = dict(weight_bit=3, group_size=32, lora_rank=4, lora_iters=2)
TINY = ["--model", "DiT-XS/2", "--image-size", "8", "--num-classes", "10", "--vae", "none",
        "--num-sampling-steps", "3", "--calib-labels", "0", "1", "2", "3", "--group-size", "32",
        "--lora-rank", "4", "--lora-iters", "2", "--no-preview", "--threads", "1"]


def _loop(model, chunks=1):
    return fp_calibration_loop(model, [i % 10 for i in range(8)], seed=1, steps=3, cfg_scale=1.5,
                               clip_denoised=True, chunks=chunks)


def _quantize(cfg, seed=0, chunks=1):
    model = random_dit(seed)
    report = quantize_dit(model, cfg, _loop(model, chunks), progress=False)
    return model, report


def _state(model):
    return {k: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bias_correction", [True, False])
def test_select_keeps_the_option_nearest_fp_end_to_end_and_equals_that_option_alone(bias_correction):
    options = ("none", 0.25, 0.75)
    cfg = QuantConfig(smoothing="select", select_from=options, bias_correction=bias_correction, **CFG)
    model, report = _quantize(cfg)
    fp = random_dit(0)
    reference = final_samples(_loop(fp))
    alone = {}
    for option, scored in zip(cfg.options(), report["selection"]["options"]):
        m, r = _quantize(option)
        alone[option] = (m, r)
        psnr = end_to_end_psnr(final_samples(_loop(m)), reference)  # brute force: the option's own loop
        assert scored["end_to_end_psnr_db"] == pytest.approx(psnr, abs=1e-4)
        assert scored["smoothing"] == option.smoothing
        assert scored["alpha"] == (None if option.smoothing == "none" else option.alpha)
    psnrs = [s["end_to_end_psnr_db"] for s in report["selection"]["options"]]
    kept = report["selection"]["kept"]
    assert kept == psnrs.index(max(psnrs))
    m, r = alone[cfg.options()[kept]]
    want, got = _state(m), _state(model)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert {n: e["alpha"] for n, e in report["layers"].items()} == {n: e["alpha"] for n, e in r["layers"].items()}
    # FP loops: TAS statistics, then per option the scoring loop (+ the correction's, whose samples are the
    # reference); without the correction one more FP loop gives the reference
    assert report["calibration"]["fp_passes"] == 1 + len(options) * (1 + bias_correction) + (not bias_correction)
    assert report["timings"]["selection_s"] > 0


def test_options_are_separate_rounds_whose_differences_matter():
    """The options really differ (else the test above proves nothing): their end-to-end PSNRs are not all equal."""
    cfg = QuantConfig(smoothing="select", select_from=("none", 0.25, 0.75), **CFG)
    _, report = _quantize(cfg)
    psnrs = [s["end_to_end_psnr_db"] for s in report["selection"]["options"]]
    assert len({round(p, 4) for p in psnrs}) == 3, psnrs


def test_select_does_not_depend_on_the_chunks():
    cfg = QuantConfig(smoothing="select", select_from=("none", 0.5), **CFG)
    one, r1 = _quantize(cfg, chunks=1)
    two, r2 = _quantize(cfg, chunks=2)
    assert r1["selection"]["kept"] == r2["selection"]["kept"]
    for a, b in zip(r1["selection"]["options"], r2["selection"]["options"]):
        assert a["end_to_end_psnr_db"] == pytest.approx(b["end_to_end_psnr_db"], abs=1e-3)
    for n, q in quantizable_layers(one).items():
        assert torch.equal(q.codes, quantizable_layers(two)[n].codes), n


def test_end_to_end_psnr_is_the_mean_of_per_sample_psnrs():
    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(3, 2, 4, 4, generator=g), torch.randn(2, 2, 4, 4, generator=g)]
    out = [r + 0.1 * k * torch.randn(r.shape, generator=g) for k, r in enumerate(ref, 1)]
    per = [10 * torch.log10(4 / (o[i] - r[i]).pow(2).mean()).item() for o, r in zip(out, ref) for i in range(len(r))]
    assert end_to_end_psnr(out, ref) == pytest.approx(sum(per) / len(per), rel=1e-5)


def test_swapped_restores_the_modules_even_on_error():
    model = random_dit()
    name = next(iter(quantizable_layers(model)))
    original = model.get_submodule(name)
    with pytest.raises(RuntimeError):
        with swapped(model, {name: torch.nn.Identity()}):
            assert isinstance(model.get_submodule(name), torch.nn.Identity)
            raise RuntimeError("boom")
    assert model.get_submodule(name) is original


def test_a_loop_without_samples_is_a_value_error():
    with pytest.raises(ValueError, match="the loop must return them"):
        final_samples(ChunkedLoop(lambda indices: None))
    model = random_dit()
    loop = _loop(model)
    with pytest.raises(ValueError, match="the loop must return them"):
        quantize_dit(model, QuantConfig(smoothing="select", bias_correction=False, **CFG), lambda: (loop(), None)[1],
                     progress=False)


def test_config_validates_and_records_the_options():
    cfg = QuantConfig(smoothing="select", select_from=("none", 0.3, 0.5))
    assert [(o.smoothing, o.alpha) for o in cfg.options()] == [("none", 0.5), ("fixed", 0.3), ("fixed", 0.5)]
    assert all(o.select_from == ("none", 0.5) and o.bias_correction for o in cfg.options())
    assert QuantConfig(smoothing="fixed").options() == [QuantConfig(smoothing="fixed")]
    assert QuantConfig().options() == QuantConfig(smoothing="select").options()  # the ditas default
    recorded = json.loads(json.dumps(cfg.to_dict()))
    assert recorded["select_from"] == ["none", 0.3, 0.5] and QuantConfig.from_dict(recorded) == cfg
    assert "select_from" not in QuantConfig(smoothing="select").to_dict()  # the default options: not recorded
    for bad, msg in [(dict(smoothing="select", select_from=()), "'none' or alphas in \\[0, 1\\]"),
                     (dict(smoothing="select", select_from=("none", 1.5)), "'none' or alphas in \\[0, 1\\]"),
                     (dict(smoothing="select", select_from=("rtn",)), "'none' or alphas in \\[0, 1\\]"),
                     (dict(smoothing="select", select_from=(0.5, 0.5)), "repeat one"),
                     (dict(smoothing="fixed", select_from=("none", 0.3)), "--select-from lists the options")]:
        with pytest.raises(ValueError, match=msg):
            QuantConfig(**bad)


def test_cli_flags_name_the_output_and_reject_mixtures(tmp_path, capsys):
    args = QuantDiT.build_parser().parse_args(TINY + ["--smoothing", "select", "--select-from", "none", "0.3"])
    cfg = QuantDiT.quant_config_from_args(args)
    assert cfg == QuantConfig(smoothing="select", select_from=("none", 0.3), group_size=32, lora_rank=4, lora_iters=2)
    assert QuantDiT.default_out_dir(args, cfg).endswith("-W4A8-ditas-fromnone-0.3-r4")  # select: the default
    for argv, fragments in [(["--smoothing", "select", "--alpha", "0.3"], ("--alpha fixes one alpha",)),
                            (["--smoothing", "fixed", "--select-from", "none", "0.3"],
                             ("--select-from lists the options",)),
                            (["--smoothing", "select", "--select-from", "0.5", "x"], ("'none' or an alpha",))]:
        code, err = call_main(QuantDiT, *TINY, "--out", str(tmp_path / "never"), *argv)
        assert_one_line_error(code, err, *fragments)
        assert not (tmp_path / "never").exists()


def test_cli_run_reports_the_choice_and_two_processes_write_its_bytes(tmp_path):
    ckpt = tmp_path / "xs.pt"
    torch.save(random_dit().state_dict(), ckpt)
    flags = TINY + ["--ckpt", str(ckpt), "--smoothing", "select", "--weight-bit", "3"]
    one = run_script("QuantDiT.py", *flags, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    said = one.stdout + one.stderr
    assert "smoothing select: 2 options in turn" in said
    assert "calibration 5/5, option 2/2 (alpha 0.5), end to end" in said
    report = json.loads((tmp_path / "one" / "report.json").read_text())
    kept = report["selection"]["options"][report["selection"]["kept"]]
    assert f"kept {'no smoothing' if kept['alpha'] is None else 'alpha 0.5'}" in said
    meta = json.loads((tmp_path / "one" / "quant_config.json").read_text())
    assert meta["smoothing"] == "select"
    assert set(meta["alphas"].values()) == {kept["alpha"]}
    two = run_script("launch.py", "--standalone", "--nproc_per_node=2", "QuantDiT.py", *flags, "--out",
                     tmp_path / "two", env={"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-2000:]
    for name in ("model.safetensors", "quant_config.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_the_planned_layout_is_the_kept_options():
    """planned_layers cannot know which option select keeps: it asks for one; each option's plan is the layout of
    the checkpoint that keeps it (smoothing factors or none)."""
    from quant.io.checkpoint import planned_layers
    from quant.io.storage import layer_info
    cfg = QuantConfig(smoothing="select", **CFG)
    with pytest.raises(ValueError, match="plan one of cfg.options"):
        planned_layers(random_dit(), cfg)
    model, report = _quantize(cfg)
    kept = cfg.options()[report["selection"]["kept"]]
    plan = planned_layers(random_dit(), kept)
    for name, q in quantizable_layers(model).items():
        assert plan[name]["smooth"] == layer_info(q)["smooth"] == (kept.smoothing != "none"), name
