"""evaluator.py end to end on the bundled digits: CLI errors, sanity of the digits-feature metrics."""
import json
import os
import types

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

import evaluator
from bundled.digits import load_digits_tensors
from ditas.pipeline import to_uint8
from bundled.classifier import load_classifier, uint8_to_input
from helpers import ROOT, assert_user_error, run_script

REF = os.path.join(ROOT, "assets", "digits_ref.npz")


@pytest.fixture(scope="module")
def ref_images():
    return evaluator.load_images(REF)


@pytest.fixture(scope="module")
def digits_features():
    return evaluator.make_extractor("digits")


@pytest.fixture(autouse=True)
def single_threaded_blas():
    """scipy's blocked sqrtm makes many small BLAS calls: threads only add contention on a busy 2-core box."""
    with threadpool_limits(limits=1):
        yield


def run_main(argv, capsys):
    """evaluator.main in-process (no interpreter start-up), shaped like a CompletedProcess."""
    try:
        evaluator.main(evaluator.build_parser().parse_args(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)


def test_reference_asset_is_adm_format_and_matches_digits():
    with np.load(REF) as data:
        images, labels = data["arr_0"], data["labels"]
    assert images.dtype == np.uint8 and images.shape == (1797, 16, 16, 3)
    x, y = load_digits_tensors(16)
    np.testing.assert_array_equal(images, to_uint8(x).numpy())
    np.testing.assert_array_equal(labels, y.numpy())


def test_classifier_is_accurate_on_real_digits(ref_images):
    with np.load(REF) as data:
        labels = data["labels"]
    with torch.no_grad():
        pred = load_classifier()(uint8_to_input(ref_images)).argmax(1).numpy()
    assert (pred == labels).mean() > 0.9


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


BAD_INPUTS = {
    "missing": (lambda d: str(d / "missing.npz"), "no such file"),
    "not npz": (lambda d: (d / "x.npz").write_text("hello") and str(d / "x.npz"), "not an .npz"),
    "npy": (lambda d: np.save(d / "x.npy", np.zeros((4, 16, 16, 3), np.uint8)) or str(d / "x.npy"), "not an .npz"),
    "no arr_0": (lambda d: write_npz(d / "k.npz", images=np.zeros((4, 16, 16, 3), np.uint8)), "no arr_0"),
    "dtype": (lambda d: write_npz(d / "f.npz", arr_0=np.zeros((4, 16, 16, 3), np.float32)), "uint8"),
    "shape": (lambda d: write_npz(d / "s.npz", arr_0=np.zeros((4, 16, 16), np.uint8)), "N x H x W x 3"),
    "channels": (lambda d: write_npz(d / "c.npz", arr_0=np.zeros((4, 16, 16, 1), np.uint8)), "N x H x W x 3"),
    "image size": (lambda d: write_npz(d / "z.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8)), "32x32"),
    "too few": (lambda d: write_npz(d / "t.npz", arr_0=np.zeros((3, 16, 16, 3), np.uint8)), "at least 4"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_sample_batch_is_one_line_exit_2(case, tmp_path, capsys):
    make, fragment = BAD_INPUTS[case]
    proc = run_main([REF, make(tmp_path), "--features", "digits"], capsys)
    assert_user_error(proc, fragment)


def test_cli_errors_without_traceback(tmp_path):
    """Through the real interpreter: a bad reference path, and Inception without its weights."""
    assert_user_error(run_script("evaluator.py", tmp_path / "nope.npz", REF, "--features", "digits"),
                      "no such file")
    proc = run_script("evaluator.py", REF, REF, env={"DITAS_INCEPTION_WEIGHTS": str(tmp_path / "none.pth")})
    assert_user_error(proc, "weights-inception-2015-12-05", str(tmp_path / "none.pth"), "--features digits")


def test_reference_against_itself(tmp_path, capsys):
    out = tmp_path / "m.json"
    proc = run_main([REF, REF, "--features", "digits", "--json", str(out)], capsys)
    assert proc.returncode == 0, proc.stderr
    for name in ("Inception Score:", "FID:", "sFID:", "Precision:", "Recall:"):
        assert name in proc.stdout
    metrics = json.loads(out.read_text())
    assert abs(metrics["fid"]) < 1e-3 and abs(metrics["sfid"]) < 1e-3
    assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    assert metrics["inception_score"] > 9  # ten balanced, confidently classified classes
    assert metrics["features"] == "digits" and metrics["num_samples"] == 1797
    assert os.listdir(tmp_path) == ["m.json"]  # the temporary file was renamed away


def shuffled_pixels(images, rng):
    flat = images.reshape(len(images), -1).copy()
    for row in flat:
        rng.shuffle(row)
    return flat.reshape(images.shape)


@pytest.mark.parametrize("corrupt", ["noise", "shuffled"])
def test_unrealistic_samples_score_far_worse(corrupt, ref_images, digits_features):
    rng = np.random.default_rng(0)
    if corrupt == "noise":
        sample = rng.integers(0, 256, size=(500, 16, 16, 3), dtype=np.uint8)
    else:
        sample = shuffled_pixels(ref_images[:500], rng)
    real = evaluate_quietly(ref_images, ref_images[rng.permutation(len(ref_images))[:500]], digits_features)
    fake = evaluate_quietly(ref_images, sample, digits_features)
    assert fake["fid"] > 100 and fake["fid"] > 20 * real["fid"]
    assert fake["precision"] < 0.1 and real["precision"] > 0.9


def evaluate_quietly(ref, sample, extractor):
    return evaluator.evaluate(ref, sample, extractor, batch_size=500, progress=False)


def test_pr_dtype_flag_defaults_to_adm_float16(capsys):
    parser = evaluator.build_parser()
    assert parser.parse_args([REF, REF]).pr_dtype == "float16"
    assert parser.parse_args([REF, REF, "--pr-dtype", "float32"]).pr_dtype == "float32"
    assert "(default: float16)" in " ".join(parser.format_help().split())
    with pytest.raises(SystemExit):
        parser.parse_args([REF, REF, "--pr-dtype", "bfloat16"])
    assert "invalid choice" in capsys.readouterr().err


def test_pr_dtype_reaches_the_metrics_and_json(tmp_path, capsys):
    out = tmp_path / "m.json"
    proc = run_main([REF, REF, "--features", "digits", "--pr-dtype", "float32", "--json", str(out)], capsys)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(out.read_text())
    assert metrics["pr_dtype"] == "float32" and metrics["precision"] == 1.0 and metrics["recall"] == 1.0
