"""The scripts' edges: help that explains every flag, inputs checked before any work, one-line errors (also under
the torchrun launcher), results never silently replaced; an output that cannot be made is found before any work."""
import os

import numpy as np
import pytest
import torch

import evaluator
import QuantDiT
import sample
import sample_merge_TAS
from bundled.digits import BUNDLED_FLAGS
from helpers import ROOT, assert_one_line_error, assert_user_error, call_main, random_dit, run_script
from ditas.shards import write_npz

SCRIPTS = {"QuantDiT.py": QuantDiT, "sample.py": sample, "sample_merge_TAS.py": sample_merge_TAS,
           "evaluator.py": evaluator}
XS = ["--model", "DiT-XS/2", "--image-size", "8", "--num-classes", "10", "--vae", "none"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_flag_has_help_and_shows_its_default(name):
    parser = SCRIPTS[name].build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{name} {action.option_strings} has no help text"
        shown = action.default is None or "default" in parser._get_formatter()._get_help_string(action)
        assert shown, f"{name} {action.option_strings} does not show its default"
    assert "--threads" in text


def test_differing_defaults_say_why():
    for name in ("QuantDiT.py", "sample.py", "sample_merge_TAS.py"):
        text = " ".join(SCRIPTS[name].build_parser().format_help().split())
        assert "upstream's sample_ddp.py" in text and "the paper's calibration setting" in text, name


@pytest.mark.parametrize("flags,fragment", [
    (["--threads", "0"], "--threads must be a positive integer"),
    (["--seed", "-1"], "--seed must be an integer in [0, 9223372036854775807]"),
    (["--weight-bit", "9"], "--weight-bit 9: bits must be"),
    (["--act-bit", "1"], "--act-bit 1: bits must be"),
])
def test_quantdit_errors_name_the_flag(tmp_path, flags, fragment):
    code, err = call_main(QuantDiT, *XS, "--ckpt", tmp_path / "nope.pt", "--out", tmp_path / "q", *flags)
    assert_one_line_error(code, err, fragment)


def test_missing_checkpoint_is_found_before_anything_is_built_or_created(tmp_path):
    """DiT-XL/2 with a missing checkpoint: the one-line error, no model built, no folder left behind."""
    code, err = call_main(QuantDiT, "--model", "DiT-XL/2", "--ckpt", tmp_path / "nope.pt",
                          "--results-dir", tmp_path / "results", "--no-preview")
    assert_one_line_error(code, err, "not found")
    assert os.listdir(tmp_path) == []
    code, err = call_main(sample_merge_TAS, "--model", "DiT-XL/2", "--vae", "none", "--ckpt", tmp_path / "nope.pt",
                          "--sample-dir", tmp_path / "samples")
    assert_one_line_error(code, err, "not found")
    assert os.listdir(tmp_path) == []


def test_sample_with_bundled_model_needs_no_labels_and_takes_any_seed(tmp_path):
    out = tmp_path / "grid.png"
    code, err = call_main(sample, *BUNDLED_FLAGS, "--num-sampling-steps", "2", "--seed", str(2 ** 31 - 1),
                          "--out", out, "--device", "cpu")
    assert code == 0, err
    assert out.stat().st_size > 0


def test_existing_npz_of_another_size_is_not_replaced_without_overwrite(tmp_path):
    ckpt = tmp_path / "xs.pt"
    torch.save(random_dit(std=0.05).state_dict(), ckpt)
    flags = [*XS, "--ckpt", ckpt, "--num-sampling-steps", "2", "--sample-dir", tmp_path / "s", "--device", "cpu",
             "--per-proc-batch-size", "2"]
    npz = tmp_path / "s" / "DiT-XS-2-size-8-vae-none-cfg-1.5-seed-0-steps-2-fp.npz"
    npz.parent.mkdir()
    write_npz(str(npz), 5, (8, 8, 3), [np.zeros((5, 8, 8, 3), np.uint8)])
    before = npz.read_bytes()
    code, err = call_main(sample_merge_TAS, *flags, "--num-fid-samples", "3")
    assert_one_line_error(code, err, "holds 5 samples, not --num-fid-samples 3", "--overwrite")
    assert npz.read_bytes() == before
    code, err = call_main(sample_merge_TAS, *flags, "--num-fid-samples", "3", "--overwrite")
    assert code == 0, err
    assert np.load(npz)["arr_0"].shape == (3, 8, 8, 3)


def test_launcher_reports_an_input_error_once_without_its_traceback(tmp_path):
    proc = run_script("launch.py", "--standalone", "--nproc_per_node=2", "sample_merge_TAS.py", *BUNDLED_FLAGS,
                      "--num-fid-samples", "0", "--sample-dir", tmp_path / "s", env={"OMP_NUM_THREADS": "1"},
                      timeout=120)
    assert_user_error(proc, "--num-fid-samples must be positive")
    assert not (tmp_path / "s").exists()


def test_quantdit_progress_names_its_phases(tmp_path):
    ckpt = tmp_path / "xs.pt"
    torch.save(random_dit(std=0.05).state_dict(), ckpt)
    proc = run_script("QuantDiT.py", *XS, "--ckpt", ckpt, "--num-sampling-steps", "2", "--calib-labels", "0", "1",
                      "--group-size", "32", "--lora-rank", "2", "--lora-iters", "1", "--smoothing", "search",
                      "--alpha-step", "0.5", "--no-preview", "--out", tmp_path / "q", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for phase in ("calibration 1/4, TAS and loss statistics", "calibration 2/4, candidate preparation",
                  "the 2 best predicted kept", "calibration 3/4, alpha search: one more FP sampling loop scores the "
                  "shortlisted candidates", "calibration 4/4, bias correction", "calibration sampling loop",
                  "candidates (smoothing, quantization, LoRA fits)"):
        assert phase in proc.stdout + proc.stderr, phase


def test_environment_files_agree_on_the_packages():
    """requirements.txt's packages and its optional ones are exactly environment.yml's pip list."""
    import re
    req = open(os.path.join(ROOT, "requirements.txt")).read()
    required = {re.split(r"[=<>]", line)[0] for line in req.splitlines() if line and not line.startswith("#")}
    optional = set(re.findall(r"^#\s+([a-z][\w-]*)\s{2,}", req, re.M))
    env = open(os.path.join(ROOT, "environment.yml")).read().split("  - pip:\n", 1)[1]  # the pip packages
    pinned = {re.split(r"[=<>]", m)[0] for m in re.findall(r"^\s+- (\S+)$", env, re.M)}
    assert optional == {"diffusers", "torch-fidelity", "matplotlib"}, optional
    assert pinned == required | optional, (pinned, required | optional)


def test_checkpoint_files_get_the_usual_permissions(tmp_path):
    from quant.calibration.driver import quantize_dit
    from quant.io.checkpoint import save_quantized
    from quant.quant_config import QuantConfig
    from helpers import calib_loop
    model = random_dit()
    quantize_dit(model, QuantConfig(group_size=32, lora_rank=0, smoothing="none"), calib_loop(model, 2, 2),
                 progress=False)
    out = save_quantized(model, {"model": "DiT-XS/2"}, {}, str(tmp_path / "q"))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask
    for name in os.listdir(out):
        assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o666 & ~umask, name


def _scripts():
    import sys
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import collect_table
    import demo
    return collect_table, demo


ABS_FLAGS = [os.path.join(ROOT, f) if f.startswith("assets/") else f for f in BUNDLED_FLAGS]  # (tests chdir)
PROC = "/proc/dit-nowhere"  # a directory that cannot be made, even by root (mkdir in /proc: ENOENT)
BUNDLED_Q = [*ABS_FLAGS, "--no-preview", "--num-sampling-steps", "2"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("script,argv,fragment", [
    ("sample_merge_TAS", [*ABS_FLAGS, "--sample-dir", PROC], f"--sample-dir {PROC} is not writable"),
    ("sample_merge_TAS", [*ABS_FLAGS, "--sample-dir", PROC + "/a/b"], "is not writable (no new entry in /proc"),
    ("QuantDiT", [*BUNDLED_Q, "--out", PROC], f"--out {PROC} is not writable"),
    ("QuantDiT", [*BUNDLED_Q, "--results-dir", PROC], "--results-dir /proc/dit-nowhere/DiT-T-2-16"),
    ("sample", [*ABS_FLAGS, "--out", PROC + ".png"], "--out /proc/dit-nowhere.png is not writable"),
    ("evaluator", ["ref.npz", "sample.npz", "--json", PROC + ".json"], "--json /proc/dit-nowhere.json is not"),
    ("demo", ["--out", PROC], f"--out {PROC} is not writable"),
])
def test_an_output_that_cannot_be_made_is_one_line_and_nothing_is_written(tmp_path, monkeypatch, script, argv,
                                                                           fragment):
    """Root passes every permission check, so the directory is tried: /proc refuses a new entry."""
    monkeypatch.chdir(tmp_path)
    module = _scripts()[1] if script == "demo" else SCRIPTS[script + ".py"]
    code, err = call_main(module, *argv)
    assert_one_line_error(code, err, fragment)
    assert os.listdir(tmp_path) == []


def test_collect_table_output_that_cannot_be_made(tmp_path, capsys):
    collect_table, _ = _scripts()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.json").write_text('{"fid": 1.0, "sample_batch": "DiT-T-2-size-16-vae-none-cfg-1.5-seed-0'
                                            '-steps-2-fp.npz"}')
    assert collect_table.main([str(tmp_path / "m"), "--out", str(tmp_path / "m" / "a.json" / "t.md")]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(2, err, "--out", "is not writable")


@pytest.mark.parametrize("script,argv,fragment", [
    ("sample_merge_TAS", [*ABS_FLAGS, "--sample-dir", "afile"], "--sample-dir {t}/afile exists and is not a dir"),
    ("QuantDiT", [*BUNDLED_Q, "--out", "afile", "--overwrite"], "--out {t}/afile exists and is not a directory"),
    ("sample", [*ABS_FLAGS, "--out", "adir"], "--out {t}/adir exists and is a directory"),
    ("sample_merge_TAS", [*ABS_FLAGS, "--cfg-scale", "nan"], "--cfg-scale must be a finite number >= 1"),
    ("sample", [*ABS_FLAGS, "--cfg-scale", "inf"], "--cfg-scale must be a finite number >= 1"),
    ("QuantDiT", [*BUNDLED_Q, "--calib-cfg-scale", "nan"], "--calib-cfg-scale must be a finite number >= 1"),
    ("QuantDiT", [*BUNDLED_Q, "--calib-memory-gb", "nan"], "--calib-memory-gb must be positive"),
    ("QuantDiT", [*BUNDLED_Q, "--smoothing", "search", "--alpha-step", "0"], "alpha step must divide 1, got 0.0"),
    ("QuantDiT", [*BUNDLED_Q, "--upscale", "0"], "--upscale must be a positive integer, got 0"),
    ("sample", [*ABS_FLAGS, "--nrow", "0"], "--nrow must be a positive integer, got 0"),
    ("sample", [*ABS_FLAGS, "--upscale", "-2"], "--upscale must be a positive integer, got -2"),
    ("evaluator", ["ref.npz", "s.npz", "--threads", "0"], "--threads must be a positive integer"),
    ("evaluator", ["ref.npz", "s.npz", "--batch-size", "0"], "--batch-size must be a positive integer"),
    ("evaluator", ["ref.npz", "s.npz", "--device", "bogus"], "--device 'bogus' is not a device"),
    ("demo", ["--out", "d", "--nproc", "0"], "--nproc must be a positive integer"),
    ("demo", ["--out", "d", "--threads", "0"], "--threads must be a positive integer"),
    ("demo", ["--out", "d", "--steps", "1001"], "--steps must be in 2..1000"),
    ("demo", ["--out", "d", "--steps", "1"], "--steps must be in 2..1000"),
    ("sample", [*ABS_FLAGS, "--num-sampling-steps", "1"], "--num-sampling-steps must be in 2..1000, got 1"),
    ("QuantDiT", [*ABS_FLAGS, "--no-preview", "--num-sampling-steps", "1"], "--num-sampling-steps must be in 2..1000"),
])
def test_bad_numbers_and_paths_of_the_wrong_kind_are_one_line_and_nothing_is_written(tmp_path, monkeypatch, script,
                                                                                     argv, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    module = _scripts()[1] if script == "demo" else SCRIPTS[script + ".py"]
    code, err = call_main(module, *argv)
    assert_one_line_error(code, err, fragment.format(t=tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adir", "afile"] and os.listdir(tmp_path / "adir") == []
