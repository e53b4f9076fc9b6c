"""The scripts' GPU behaviour, proven on a CPU: one float32 arithmetic (--tf32) from calibration to sampling,
integer layers prepared once on their device, the kernel they run named once (--int-kernel forces one), and
the VAE decoded in bounded sub-batches."""
import argparse
import json
import os
from types import SimpleNamespace

import pytest
import torch

import QuantDiT
from ditas import cli
from ditas import pipeline
import sample
import sample_merge_TAS
from helpers import assert_one_line_error, calib_loop, call_main, random_dit
from quant.calibration.driver import quantize_dit
from quant.io.checkpoint import save_quantized
from quant.quant_config import QuantConfig
from quant.method.fold import fold_smoothing
from quant.nn.inference import kernel_lines, load_checkpoint, to_backend
from quant.nn.int_linear import IntLinear
from quant.nn.qlinear import QuantLinear

XS = ["--model", "DiT-XS/2", "--image-size", "8", "--num-classes", "10", "--vae", "none"]
INT_LAYERS = 8  # DiT-XS/2: 2 blocks x (qkv, proj, fc1, fc2)


@pytest.fixture
def tf32_restored():
    """Tests that set TF32 leave the process as they found it."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _tf32():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture(scope="module")
def qdirs(tmp_path_factory):
    """{tf32 recorded: a W8A8 checkpoint dir of a random DiT-XS/2} (plain round-to-nearest: quick)."""
    model = random_dit()
    cfg = QuantConfig(weight_bit=8, group_size=32, lora_rank=0, smoothing="none")
    quantize_dit(model, cfg, calib_loop(model, 2, 2), progress=False)
    meta = {"model": "DiT-XS/2", "image_size": 8, "num_classes": 10, "vae": "none", "in_channels": 3,
            **cfg.to_dict()}
    root = tmp_path_factory.mktemp("q")
    return {tf32: save_quantized(model, dict(meta, tf32=tf32), {}, str(root / f"tf32-{tf32}")) for tf32 in (0, 1)}


def _folded(path):
    model, _ = load_checkpoint(path)
    return fold_smoothing(model)


# ------------------------------------------------------------------ one arithmetic: --tf32

def test_set_tf32_sets_matmuls_and_convolutions(tf32_restored):
    for enabled in (True, False, True):
        cli.set_tf32(enabled)
        assert _tf32() == (enabled, enabled)


def test_quantdit_applies_and_records_tf32(tmp_path, tf32_restored):
    ckpt = tmp_path / "xs.pt"
    torch.save(random_dit(std=0.05).state_dict(), ckpt)
    for flag, want in (([], False), (["--tf32"], True)):
        out = tmp_path / f"q{want}"
        cli.set_tf32(not want)
        code, err = call_main(QuantDiT, *XS, "--ckpt", ckpt, "--num-sampling-steps", "2", "--calib-labels", "0", "1",
                              "--group-size", "32", "--lora-rank", "0", "--smoothing", "none", "--no-preview",
                              "--out", out, *flag)
        assert code == 0, err
        assert json.loads((out / "quant_config.json").read_text())["tf32"] is want
        assert _tf32() == (want, want)


@pytest.mark.parametrize("script", [sample, sample_merge_TAS])
def test_sampling_takes_the_checkpoints_tf32_unless_told(script, qdirs, tmp_path, tf32_restored):
    for recorded, flag, want in ((1, [], True), (0, [], False), (1, ["--no-tf32"], False), (0, ["--tf32"], True)):
        cli.set_tf32(not want)
        out = ["--out", tmp_path / "g.png"] if script is sample else ["--sample-dir", tmp_path / "s",
                                                                      "--num-fid-samples", "2", "--overwrite"]
        code, err = call_main(script, "--path", qdirs[recorded], "--num-sampling-steps", "2", "--device", "cpu",
                              *out, *flag)
        assert code == 0, err
        assert _tf32() == (want, want), (recorded, flag)


def test_fp_sampling_defaults_to_ieee_float32():
    args = argparse.Namespace(path=None, tf32=None, act_bit=None, weight_bit=None, model=None, image_size=None,
                              num_classes=None, vae=None)
    cli.resolve_model_args(args, {"model": "DiT-XS/2", "image_size": 8, "num_classes": 10, "vae": "none"})
    assert args.tf32 is False


def test_fingerprint_records_tf32_on_cuda_only(qdirs, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    args = sample_merge_TAS.build_parser().parse_args(["--path", qdirs[0]])
    meta = cli.resolve_model_args(args, sample_merge_TAS.MODEL_DEFAULTS)
    model = _folded(qdirs[0])
    prints = {}
    for tf32 in (False, True):
        args.tf32 = tf32
        for device in ("cpu", "cuda"):
            prints[tf32, device] = sample_merge_TAS.fingerprint(model, args, meta, torch.device(device))
    assert prints[False, "cpu"] == prints[True, "cpu"]
    assert prints[False, "cuda"] != prints[True, "cuda"]


# ------------------------------------------------------------------ prepared once, on the device; the kernel named

def test_to_backend_moves_the_model_before_preparing_the_integer_layers(qdirs, monkeypatch):
    model = _folded(qdirs[0])
    events = []
    real_to, real_prepare = model.to, IntLinear._prepare

    def to(*args, **kwargs):
        events.append(("to", torch.device(args[0])))
        return real_to(*args, **kwargs)

    def prepare(self):
        events.append(("prepare", self.scale.device))
        return real_prepare(self)

    model.to = to
    monkeypatch.setattr(IntLinear, "_prepare", prepare)
    model = to_backend(model, "int", torch.device("cpu"), "torch", path="q")
    assert events == [("to", torch.device("cpu"))] + [("prepare", torch.device("cpu"))] * INT_LAYERS
    layers = [m for m in model.modules() if isinstance(m, IntLinear)]
    assert len(layers) == INT_LAYERS and not any(isinstance(m, QuantLinear) for m in model.modules())
    assert {m.runs for m in layers} == {"torch"}  # --int-kernel torch: every layer on torch ops


def test_kernel_lines_name_the_kernel_and_warn_of_the_slow_fallback_on_cuda(qdirs, monkeypatch):
    from quant.kernels import ops_avx512, ops_triton
    model = to_backend(_folded(qdirs[0]), "int", torch.device("cpu"), "torch", path="q")
    cpu = kernel_lines(model, torch.device("cpu"), "torch")
    assert cpu == [f"integer kernel on cpu: torch ({INT_LAYERS} layers); --int-kernel torch"]
    monkeypatch.setattr(ops_triton, "status", lambda: "triton not importable (ImportError: x); pip install triton")
    lines = kernel_lines(model, torch.device("cuda"), "auto")
    assert len(lines) == 2 and lines[0].startswith(f"integer kernel on cuda: torch ({INT_LAYERS} layers); auto: "
                                                   "triton not importable")
    assert "slower than bf16" in lines[1] and "pip install triton" in lines[1]
    monkeypatch.setattr(ops_avx512, "status", lambda: "CPU lacks AVX512-VNNI")
    assert kernel_lines(model, torch.device("cpu"), "auto")[0].endswith(
        "auto: fused kernel unavailable (CPU lacks AVX512-VNNI), so torch ops")
    triton = to_backend(_folded(qdirs[0]), "int", torch.device("cpu"), "triton", path="q")  # the interpreter
    assert kernel_lines(triton, torch.device("cuda"), "auto") == [
        f"integer kernel on cuda: triton ({INT_LAYERS} layers); auto: triton not importable (ImportError: x); "
        "pip install triton"]
    assert kernel_lines(_folded(qdirs[0]), torch.device("cpu")) == []  # fake backend: nothing to say


@pytest.mark.parametrize("script", [sample, sample_merge_TAS])
def test_the_kernel_line_is_printed_once(script, qdirs, tmp_path, capsys):
    out = (["--out", tmp_path / "g.png"] if script is sample
           else ["--sample-dir", tmp_path / "s", "--num-fid-samples", "3", "--per-proc-batch-size", "2"])
    code, err = call_main(script, "--path", qdirs[0], "--num-sampling-steps", "2", "--device", "cpu",
                          "--backend", "int", "--int-kernel", "torch", *out)
    assert code == 0, err
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("integer kernel")]
    assert lines == [f"integer kernel on cpu: torch ({INT_LAYERS} layers); --int-kernel torch"]


@pytest.mark.parametrize("script", [sample, sample_merge_TAS])
def test_bad_kernel_choices_are_one_line_errors(script, qdirs, tmp_path, monkeypatch):
    from quant.kernels import ops_avx512
    monkeypatch.setattr(ops_avx512, "load", lambda: None)
    monkeypatch.setattr(ops_avx512, "status", lambda: "CPU lacks AVX512-VNNI")
    out = ["--out", tmp_path / "g.png"] if script is sample else ["--sample-dir", tmp_path / "s"]
    base = ["--path", qdirs[0], "--num-sampling-steps", "2", "--device", "cpu", *out]
    for flags, fragments in (
            (["--backend", "int", "--int-kernel", "fused"], ["--int-kernel fused", "fused integer kernel unavailable",
                                                             "CPU lacks AVX512-VNNI"]),
            (["--int-kernel", "torch"], ["--int-kernel torch applies to --backend int"]),
            (["--backend", "int", "--int-kernel", "cuda"], ["--int-kernel", "invalid choice"])):
        code, err = call_main(script, *base, *flags)
        assert_one_line_error(code, err, *fragments)
        assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ the VAE in bounded sub-batches

class FakeVAE:
    """A decoder whose every image depends on its own latent only (elementwise: batch-invariant bit for bit);
    records the batch of every call."""

    def __init__(self):
        self.calls = []

    def decode(self, z):
        self.calls.append(len(z))
        x = torch.tanh(z[:, :3] * 0.7 - z[:, 3:] * 0.2)
        return SimpleNamespace(sample=x.repeat_interleave(8, -1).repeat_interleave(8, -2))


def test_vae_decodes_in_sub_batches_equal_to_one_batch():
    z = torch.randn(2 * pipeline.VAE_DECODE_BATCH + 3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    vae = FakeVAE()
    whole = vae.decode(z / pipeline.VAE_SCALE).sample
    vae.calls.clear()
    parts = pipeline.decode(vae, z)
    assert vae.calls == [pipeline.VAE_DECODE_BATCH, pipeline.VAE_DECODE_BATCH, 3]
    assert parts.shape == (len(z), 3, 32, 32) and torch.equal(parts, whole)
    assert pipeline.decode(vae, z[:3]).shape[0] == 3 and vae.calls[-1] == 3
    assert pipeline.decode(None, z) is z  # pixel models (--vae none): the sample is the image
