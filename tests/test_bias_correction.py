"""Bias correction (quant/calibration/bias.py, QuantConfig.bias_correction, --bias-correction), on tiny random DiTs."""
import copy
import json

import pytest
import torch

import QuantDiT
from helpers import HostSyncs, calib_loop, random_dit, run_script
from quant.calibration.bias import MeanError, mean_output_errors
from quant.calibration.driver import collect_tas, quantize_dit
from quant.calibration.feed import run_hooked
from quant.calibration.loop import fp_calibration_loop
from quant.io.checkpoint import load_quantized
from quant.method.layers import quantizable_layers
from quant.quant_config import QuantConfig
from quant.search.candidates import quantize_linear

CFG = dict(group_size=32, lora_rank=4, lora_iters=2)
SEARCH = dict(CFG, smoothing="search", alpha_step=0.25)
TINY = ["--model", "DiT-XS/2", "--image-size", "8", "--num-classes", "10", "--vae", "none",
        "--num-sampling-steps", "3", "--calib-labels", "0", "1", "2", "3", "--group-size", "32",
        "--lora-rank", "4", "--lora-iters", "2", "--no-preview", "--threads", "1"]


def _quantized(model, loop, alpha=0.5, bits=3):
    """{name: QuantLinear} of every layer at a fixed alpha (3-bit weights: a visible mean error)."""
    cfg = QuantConfig(weight_bit=bits, alpha=alpha, **CFG)
    absmax = collect_tas(quantizable_layers(model), loop)
    return {n: quantize_linear(lin, alpha, absmax[n], cfg.weight_cfg(), cfg.act_cfg(), 4, 2)
            for n, lin in quantizable_layers(model).items()}


def _errors(layers, quantized, loop):
    """Brute force: {name: every step's Y_q - Y_fp rows, concatenated (float64)}."""
    rows = {n: [] for n in layers}
    run_hooked(layers, lambda n, x, y: rows[n].append((quantized[n](x) - y).reshape(-1, y.shape[-1]).double()), loop,
               outputs=True)
    return {n: torch.cat(r) for n, r in rows.items()}


def test_mean_error_is_the_mean_over_every_row_of_every_update():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(2, 5, 7, generator=g) + 3, torch.randn(4, 3, 7, generator=g), torch.randn(1, 7, generator=g)]
    m = MeanError()
    for p in parts:
        m.update(p)
    want = torch.cat([p.reshape(-1, 7) for p in parts]).double().mean(0).float()
    assert m.rows == 10 + 12 + 1
    torch.testing.assert_close(m.value, want, rtol=0, atol=1e-6)


def test_correction_zeroes_the_mean_error_and_removes_its_square():
    """mean_output_errors equals the brute-force mean of Y_q - Y_fp over the loop; after lower_bias(mu), the mean
    error is ~0 and the mean squared error has dropped by exactly mean(mu^2)."""
    model = random_dit()
    loop = calib_loop(model, 3, 8)
    layers = quantizable_layers(model)
    before = _quantized(model, loop)
    mu = mean_output_errors(layers, before, loop)
    brute = _errors(layers, before, loop)
    after = copy.deepcopy(before)
    for n, q in after.items():
        q.lower_bias(mu[n])
    fixed = _errors(layers, after, loop)
    for n in layers:
        torch.testing.assert_close(mu[n], brute[n].mean(0).float(), rtol=1e-5, atol=1e-7)
        assert mu[n].abs().max() > 1e-4, n  # a real mean error to remove
        assert fixed[n].mean(0).abs().max() < 1e-3 * mu[n].abs().max(), n
        drop = brute[n].pow(2).mean() - fixed[n].pow(2).mean()
        torch.testing.assert_close(drop, mu[n].double().pow(2).mean(), rtol=1e-3, atol=0)
        # the layer is otherwise the same: codes, scales, LoRA and smoothing untouched
        for leaf in ("codes", "scale", "zero", "lora_L", "lora_R", "smooth"):
            assert torch.equal(getattr(before[n], leaf), getattr(after[n], leaf)), (n, leaf)


def test_a_layer_without_bias_gets_one():
    lin = torch.nn.Linear(64, 32, bias=False)
    q = quantize_linear(lin, None, None, QuantConfig(**CFG).weight_cfg(), None, lora_rank=0)
    mu = torch.randn(32)
    assert q.bias is None
    q.lower_bias(mu)
    assert torch.equal(q.bias, -mu) and "bias" in dict(q.named_buffers())


def _fp_and_quantized(bias_correction, chunks=1, labels=8):
    model = random_dit()
    fp = copy.deepcopy(model)
    loop = fp_calibration_loop(model, [i % 10 for i in range(labels)], seed=1, steps=3, cfg_scale=1.5,
                               clip_denoised=True, chunks=chunks)
    report = quantize_dit(model, QuantConfig(bias_correction=bias_correction, **SEARCH), loop, progress=False)
    return fp, model, report


def test_quantize_dit_moves_the_mean_error_into_the_bias_and_nothing_else():
    fp, off, _ = _fp_and_quantized(False)
    _, on, report = _fp_and_quantized(True)
    fp_layers, q_on, q_off = quantizable_layers(fp), quantizable_layers(on), quantizable_layers(off)
    loop = fp_calibration_loop(fp, list(range(8)), seed=1, steps=3, cfg_scale=1.5, clip_denoised=True)
    mu_off = mean_output_errors(fp_layers, q_off, loop)
    mu_on = mean_output_errors(fp_layers, q_on, loop)
    assert "bias_correction_s" in report["timings"]
    for n in fp_layers:
        assert torch.equal(q_on[n].codes, q_off[n].codes) and torch.equal(q_on[n].smooth, q_off[n].smooth)
        torch.testing.assert_close(q_off[n].bias - q_on[n].bias, mu_off[n], rtol=1e-5, atol=1e-7)
        assert mu_on[n].abs().max() < 1e-3 * mu_off[n].abs().max(), n
        entry = report["layers"][n]["bias_correction"]
        assert entry["mean_error_rms"] == pytest.approx(mu_off[n].pow(2).mean().sqrt().item(), rel=1e-5)
        assert entry["mean_error_max"] == pytest.approx(mu_off[n].abs().max().item(), rel=1e-5)


def test_bias_correction_does_not_depend_on_the_chunks():
    _, one, _ = _fp_and_quantized(True, chunks=1)
    _, two, _ = _fp_and_quantized(True, chunks=2)
    for n, q in quantizable_layers(one).items():
        torch.testing.assert_close(q.bias, quantizable_layers(two)[n].bias, rtol=0, atol=1e-6)


def test_bias_correction_pass_has_no_host_sync_per_step():
    """The pass's syncs beyond the FP loop's own do not grow with the number of steps (CUDA: none per step)."""
    extra = []
    for steps in (2, 4):
        model = random_dit()
        loop = calib_loop(model, steps, 4)
        quantized = _quantized(model, loop)
        with HostSyncs() as fp_only:
            loop()
        with HostSyncs() as syncs:
            mean_output_errors(quantizable_layers(model), quantized, loop)
        extra.append(syncs.count - fp_only.count)
    assert extra[0] == extra[1], extra


def test_cli_flag_records_names_and_roundtrips(tmp_path):
    ckpt = tmp_path / "xs.pt"
    torch.save(random_dit().state_dict(), ckpt)
    args = QuantDiT.build_parser().parse_args(TINY + ["--smoothing", "fixed", "--bias-correction"])
    assert QuantDiT.quant_config_from_args(args) == QuantConfig(smoothing="fixed", bias_correction=True, **CFG)
    assert QuantDiT.default_out_dir(args, QuantConfig(bias_correction=False)).endswith("-nobiascorr")
    assert QuantDiT.default_out_dir(args, QuantConfig(scheme="reference", bias_correction=True)).endswith("-biascorr")
    assert QuantDiT.default_out_dir(args, QuantConfig()).endswith("-W4A8-ditas")  # the defaults: no suffix
    on, off = tmp_path / "on", tmp_path / "off"
    said = {}
    for out, flag in ((on, "--bias-correction"), (off, "--no-bias-correction")):
        proc = run_script("QuantDiT.py", *TINY, "--ckpt", ckpt, "--out", out, "--smoothing", "fixed", flag)
        assert proc.returncode == 0, proc.stderr[-3000:]
        said[flag] = proc.stdout + proc.stderr
    assert "calibration 4/4, bias correction: one more FP sampling loop" in said["--bias-correction"]
    assert "calibration 3/3, alpha search: one alpha, nothing to search" in said["--no-bias-correction"]
    assert "bias correction" not in said["--no-bias-correction"]
    meta_on = json.loads((on / "quant_config.json").read_text())
    meta_off = json.loads((off / "quant_config.json").read_text())
    assert meta_on["bias_correction"] is True and "bias_correction" not in meta_off  # off: as before the flag
    m_on, _ = load_quantized(str(on))
    m_off, _ = load_quantized(str(off))
    report = json.loads((on / "report.json").read_text())
    for n, q in quantizable_layers(m_on).items():
        q_off = quantizable_layers(m_off)[n]
        assert torch.equal(q.codes, q_off.codes) and not torch.equal(q.bias, q_off.bias)
        rms = (q_off.bias - q.bias).pow(2).mean().sqrt().item()  # as stored (fp16)
        assert rms == pytest.approx(report["layers"][n]["bias_correction"]["mean_error_rms"], rel=2e-2, abs=1e-4)


def test_two_processes_write_the_single_process_checkpoint(tmp_path):
    """Rank 0 measures the mean errors alone, after gathering every rank's layers: the bytes do not depend on the
    number of processes."""
    ckpt = tmp_path / "xs.pt"
    torch.save(random_dit().state_dict(), ckpt)
    flags = TINY + ["--ckpt", str(ckpt), "--bias-correction"]
    one = run_script("QuantDiT.py", *flags, "--out", tmp_path / "one")
    two = run_script("launch.py", "--standalone", "--nproc_per_node=2", "QuantDiT.py", *flags, "--out",
                     tmp_path / "two", env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    for name in ("model.safetensors", "quant_config.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_ditas_default_selects_with_bias_correction_and_reference_is_the_released_search():
    d, r = QuantConfig(), QuantConfig(scheme="reference")
    assert (d.smoothing, d.select_from, d.bias_correction, d.search) == ("select", ("none", 0.5), True, "exact")
    assert [(o.smoothing, o.alpha, o.bias_correction) for o in d.options()] == [("none", 0.5, True),
                                                                                ("fixed", 0.5, True)]
    assert (r.smoothing, r.bias_correction, r.search, len(r.alphas())) == ("search", False, "exact", 21)
    s = QuantConfig(smoothing="search")
    assert (s.search, s.search_shortlist, s.bias_correction) == ("shortlist", 2, True)
    with pytest.raises(ValueError, match="--alpha-step sets the searched alpha grid: it needs --smoothing search"):
        QuantConfig(alpha_step=0.1)
    for cfg in (d, r, s, QuantConfig(bias_correction=False), QuantConfig(smoothing="fixed"), QuantConfig(scheme="reference", bias_correction=True),
                QuantConfig(smoothing="none", lora_order="svd_first")):
        assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert "bias_correction" not in QuantConfig(bias_correction=False).to_dict()  # recorded as before it existed
