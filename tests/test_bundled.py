"""The bundled digits model: its model card, its sample quality, and W8A8 staying close to FP."""
import os
import re

import pytest
import torch

import sample
from bundled.digits import BUNDLED_CKPT, BUNDLED_FLAGS
from bundled.classifier import label_accuracy
from download import find_model, load_model_state
from helpers import ROOT, assert_one_line_error, call_main
from models import DiT_models
from ditas.pipeline import to_uint8
from diffusion.sampling import make_sampler, sample_inputs
from quant.calibration.driver import quantize_dit
from quant.quant_config import QuantConfig


def bundled_model():
    model = DiT_models["DiT-T/2"](input_size=16, in_channels=3, num_classes=10)
    load_model_state(model, find_model(os.path.join(ROOT, BUNDLED_CKPT)), BUNDLED_CKPT)
    return model.eval()


def test_model_card_flags_line_selects_the_bundled_model():
    card = open(os.path.join(ROOT, "assets", "README.md")).read()
    lines = [l for l in card.splitlines() if l.startswith("flags:")]
    assert len(lines) == 1
    assert lines[0].split()[1:] == BUNDLED_FLAGS
    assert re.search(r"python bundled/train\.py", card)  # the exact training command is recorded


@pytest.fixture(scope="module")
def fp_samples():
    """100 samples of the bundled model at cfg 4, 50 steps: (uint8 NHWC, labels)."""
    model = bundled_model()
    n = 100
    labels = [i % 10 for i in range(n)]
    gens, y, z = sample_inputs(0, range(n), 10, (3, 16, 16), labels)
    with torch.no_grad():
        x = make_sampler(model, 50, 4.0, clip_denoised=True)(z, y, gens)
    return to_uint8(x).numpy(), labels


def test_bundled_samples_are_classified_as_their_label(fp_samples):
    images, labels = fp_samples
    acc = label_accuracy(images, labels)
    print(f"bundled model, cfg 4, 50 steps: {acc:.1%} of {len(labels)} samples classified as their label")
    assert acc >= 0.8


def test_evaluator_scores_bundled_samples_above_noise(fp_samples):
    import numpy as np

    from evaluator import evaluate, make_extractor
    images, _ = fp_samples
    ref = np.load(os.path.join(ROOT, "assets", "digits_ref.npz"))["arr_0"]
    extractor = make_extractor("digits")
    fp = evaluate(ref, images, extractor, progress=False)
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    bad = evaluate(ref, noise, extractor, progress=False)
    print(f"FID-digits: bundled FP samples {fp['fid']:.2f}, uniform noise {bad['fid']:.2f}")
    assert np.isfinite(fp["fid"]) and fp["fid"] >= 0
    assert bad["fid"] > 2 * fp["fid"] and bad["inception_score"] < fp["inception_score"]


@torch.no_grad()
def test_w8a8_output_stays_close_to_fp():
    model = bundled_model()
    x = torch.randn(8, 3, 16, 16)
    t = torch.tensor([999, 800, 600, 400, 250, 100, 20, 0])
    y = torch.arange(8)
    ref = model(x, t, y)
    sampler = make_sampler(model, 10, 1.5, clip_denoised=True)

    def loop():
        gens, yy, z = sample_inputs(1, range(8), 10, (3, 16, 16), list(range(8)))
        sampler(z, yy, gens)

    cfg = QuantConfig(weight_bit=8, act_bit=8, group_size=128, lora_rank=8, lora_iters=3, smoothing="search",
    alpha_step=0.25)
    quantize_dit(model, cfg, loop, progress=False)
    out = model(x, t, y)
    rel = float((out - ref).norm() / ref.norm())
    print(f"bundled model W8A8 relative output error: {rel:.4f}")
    assert rel < 0.05


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sample_py_writes_grid(tmp_path, dtype):
    out = tmp_path / "grid.png"
    code, err = call_main(sample, *BUNDLED_FLAGS, "--labels", "3", "7", "--num-sampling-steps", "5",
                          "--out", out, "--cfg-scale", "4", "--dtype", dtype)
    assert code in (0, None), err
    from PIL import Image
    img = Image.open(out)
    assert img.size == (2 * 16 + 3 * 2, 16 + 2 * 2)


def test_sample_py_bf16_needs_int_backend_for_quantized(tmp_path):
    (tmp_path / "q").mkdir()
    code, err = call_main(sample, "--path", tmp_path / "q", "--dtype", "bf16", "--labels", "1",
                          "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "--backend int")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("flags,fragment", [
    (["--labels", "10"], "label 10 outside [0, 10)"),
    (["--image-size", "32"], "has shape"),
    (["--model", "DiT-T/4"], "has shape"),
])
def test_sample_py_bad_input(tmp_path, flags, fragment):
    argv = list(BUNDLED_FLAGS)
    for i in range(0, len(flags), 2):
        if flags[i] in argv:
            argv[argv.index(flags[i]) + 1] = flags[i + 1]
        else:
            argv += flags[i:i + 2]
    code, err = call_main(sample, *argv, "--num-sampling-steps", "2", "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "x.png").exists()
