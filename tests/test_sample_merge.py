"""sample_merge_TAS.py: DDP-independent, resumable, deterministic sampling into one ADM .npz."""
import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ditas.cli import run
from helpers import ROOT, assert_user_error, free_port, random_dit, run_script

N, BATCH, STEPS = 7, 2, 150  # 4 shards, the last one short; enough steps that a run can be killed mid-way
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
NAME = f"DiT-XS-2-size-8-vae-none-cfg-1.5-seed-0-steps-{STEPS}-fp"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "xs.pt"
    torch.save(random_dit(std=0.05).state_dict(), path)
    return path


def _flags(ckpt, sample_dir, steps=STEPS, n=N, batch=BATCH):
    return ["--model", "DiT-XS/2", "--image-size", "8", "--num-classes", "10", "--vae", "none", "--ckpt", str(ckpt),
            "--num-fid-samples", str(n), "--per-proc-batch-size", str(batch), "--num-sampling-steps", str(steps),
            "--sample-dir", str(sample_dir), "--device", "cpu"]


@pytest.fixture(scope="module")
def single_run(ckpt, tmp_path_factory):
    """One uninterrupted single-process run: the reference .npz."""
    out = tmp_path_factory.mktemp("single")
    proc = run_script("sample_merge_TAS.py", *_flags(ckpt, out), env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / f"{NAME}.npz", proc


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_npz_format(single_run):
    path, proc = single_run
    assert str(path) in proc.stdout
    with np.load(path, allow_pickle=False) as data:
        assert data.files == ["arr_0"]
        arr = data["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (N, 8, 8, 3)
    assert arr.std() > 0
    assert not glob.glob(str(path.parent / f"{NAME}.shards" / "shard-*"))  # shards removed once complete
    assert not os.path.exists(path.parent / NAME)  # no PNG folder without --save-png


def test_torchrun_two_processes_byte_identical(single_run, ckpt, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", "sample_merge_TAS.py", *_flags(ckpt, tmp_path)],
                          cwd=ROOT, env=dict(os.environ, **ENV), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout
    assert _bytes(tmp_path / f"{NAME}.npz") == _bytes(single_run[0])


def test_sigkill_then_resume_matches(single_run, ckpt, tmp_path):
    shard_dir = tmp_path / f"{NAME}.shards"
    proc = subprocess.Popen([sys.executable, "sample_merge_TAS.py", *_flags(ckpt, tmp_path)], cwd=ROOT,
                            env=dict(os.environ, **ENV), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    try:
        while not glob.glob(str(shard_dir / "shard-*.npy")):
            assert proc.poll() is None, "the run ended before writing a shard could be observed"
            assert time.time() < deadline, "no shard appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    shards = sorted(glob.glob(str(shard_dir / "shard-*.npy")))
    assert 1 <= len(shards) < 4, shards
    assert not (tmp_path / f"{NAME}.npz").exists()
    with open(shards[0], "r+b") as f:  # and a corrupt shard must be re-sampled, not trusted
        f.truncate(100)
    rerun = run_script("sample_merge_TAS.py", *_flags(ckpt, tmp_path), env=ENV, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"({4 - len(shards) + 1} of 4 shards sampled" in rerun.stdout, rerun.stdout  # missing + corrupt only
    assert _bytes(tmp_path / f"{NAME}.npz") == _bytes(single_run[0])
    assert not glob.glob(str(shard_dir / "*.tmp-*"))


# ------------------------------------------------------------------ in-process runs (fast, tiny step counts)

def _main(argv):
    import sample_merge_TAS
    return run(sample_merge_TAS.main, sample_merge_TAS.build_parser().parse_args(argv))


def test_rerun_after_completion_is_noop_and_save_png(ckpt, tmp_path, capsys):
    flags = _flags(ckpt, tmp_path, steps=3, n=5)
    npz = _main(flags)
    mtime = os.stat(npz).st_mtime_ns
    capsys.readouterr()
    assert _main(flags) == npz
    out = capsys.readouterr().out
    assert "nothing to do" in out and npz in out
    assert os.stat(npz).st_mtime_ns == mtime
    # --save-png on the completed run writes the PNGs from the .npz, identical to the arrays
    _main(flags + ["--save-png"])
    from PIL import Image
    pngs = sorted(glob.glob(os.path.join(str(tmp_path), os.path.basename(npz)[:-4], "*.png")))
    assert [os.path.basename(p) for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    arr = np.load(npz)["arr_0"]
    for i, p in enumerate(pngs):
        assert np.array_equal(np.asarray(Image.open(p)), arr[i])


def test_changed_weights_start_over(ckpt, tmp_path, capsys):
    other = tmp_path / "other.pt"
    torch.save(random_dit(seed=0, std=0.05).state_dict(), other)
    flags = _flags(other, tmp_path / "s", steps=3, n=5) + ["--keep-shards"]
    first = np.load(_main(flags))["arr_0"]
    torch.save(random_dit(seed=1, std=0.05).state_dict(), other)  # same path and name, other weights
    second = np.load(_main(flags))["arr_0"]
    assert "starting over" in capsys.readouterr().out
    fresh = np.load(_main(_flags(other, tmp_path / "fresh", steps=3, n=5)))["arr_0"]
    assert np.array_equal(second, fresh) and not np.array_equal(first, second)


# ------------------------------------------------------------------ --path (quantized checkpoints)

def _quantized_dit(scheme="ditas"):
    """A random DiT-XS/2 whose 4 linears per block are smoothed QuantLinear layers (W4A8)."""
    from functools import partial
    from quant.method.lora import fit_lora
    from quant.nn.qlinear import QuantLinear
    from quant.method.quantizer import quantize_weight
    from quant.quant_config import ActQuantConfig, WeightQuantConfig
    model = random_dit(std=0.1)
    g = torch.Generator().manual_seed(3)
    wcfg = WeightQuantConfig(bits=4, group_size=32, scheme=scheme)
    acfg = ActQuantConfig(bits=8, granularity="row", scheme=scheme)
    for block in model.blocks:
        for parent, attr in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "fc1"), (block.mlp, "fc2")):
            lin = getattr(parent, attr)
            s = torch.exp(torch.randn(lin.in_features, generator=g) * 0.5)
            fit = fit_lora(lin.weight.detach() * s, partial(quantize_weight, cfg=wcfg), rank=4, iters=2)
            setattr(parent, attr, QuantLinear(fit.qweight, lin.bias.detach(), fit.L, fit.R, smooth=s, act_cfg=acfg))
    return model.eval()


META = {"model": "DiT-XS/2", "image_size": 8, "num_classes": 10, "vae": "none", "in_channels": 3,
        "scheme": "ditas", "weight_bit": 4, "act_bit": 8, "act_granularity": "row", "group_size": 32}


@pytest.fixture
def qdir(tmp_path, monkeypatch):
    """A real quantized checkpoint dir (quant.io.checkpoint.save_quantized); load_quantized calls are recorded."""
    import quant.io.checkpoint
    path = quant.io.checkpoint.save_quantized(_quantized_dit(), dict(META), {}, str(tmp_path / "W4A8"))
    calls = []
    real_load = quant.io.checkpoint.load_quantized

    def load_quantized(p, device="cpu"):
        calls.append(p)
        return real_load(p, device=device)

    monkeypatch.setattr(quant.io.checkpoint, "load_quantized", load_quantized)
    return path, calls


def _qflags(qdir, sample_dir, *extra):
    return ["--path", str(qdir), "--num-fid-samples", "3", "--per-proc-batch-size", "2", "--num-sampling-steps",
            "3", "--sample-dir", str(sample_dir), "--device", "cpu", *extra]


def test_path_loads_folds_and_names(qdir, tmp_path, monkeypatch):
    import quant.method.fold
    folded = []
    real_fold = quant.method.fold.fold_smoothing

    def spy(model):
        out = real_fold(model)
        folded.append([(b.attn.qkv.smooth, b.attn.proj.smooth, b.mlp.fc1.smooth, b.mlp.fc2.smooth) for b in out.blocks])
        return out

    monkeypatch.setattr(quant.method.fold, "fold_smoothing", spy)
    # model flags come from quant_config.json; explicit ones that agree (and matching bits) are fine
    npz = _main(_qflags(qdir[0], tmp_path / "s", "--model", "DiT-XS/2", "--weight-bit", "4", "--act-bit", "8"))
    assert os.path.basename(npz) == "DiT-XS-2-size-8-vae-none-cfg-1.5-seed-0-steps-3-W4A8-ditas.npz"
    assert qdir[1] == [str(qdir[0])]
    assert len(folded) == 1 and all(q is None and p is None and f1 is None and f2 is not None
                                    for q, p, f1, f2 in folded[0])
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (3, 8, 8, 3) and arr.dtype == np.uint8


@pytest.mark.parametrize("extra,fragments", [
    (["--act-bit", "4"], ["--act-bit 4", "act_bit 8"]),
    (["--weight-bit", "8"], ["--weight-bit 8", "weight_bit 4"]),
    (["--model", "DiT-T/2"], ["--model DiT-T/2", "DiT-XS/2"]),
    (["--image-size", "16"], ["--image-size 16", "8"]),
    (["--num-classes", "1000"], ["--num-classes 1000", "10"]),
])
def test_path_mismatch_is_user_error(qdir, tmp_path, capsys, extra, fragments):
    with pytest.raises(SystemExit) as e:
        _main(_qflags(qdir[0], tmp_path / "s", *extra))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert all(f in err for f in fragments), err
    assert qdir[1] == [] and not glob.glob(str(tmp_path / "s" / "*.npz"))


# ------------------------------------------------------------------ bad inputs: one line, exit 2, no npz

def test_bad_inputs_subprocess(ckpt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        (["--num-fid-samples", "0"], ["--num-fid-samples"]),
        (["--sample-dir", str(blocker / "sub")], ["not writable"]),
    ]
    for extra, fragments in cases:
        proc = run_script("sample_merge_TAS.py", *_flags(ckpt, tmp_path / "out", steps=3), *extra, env=ENV,
                          timeout=60)
        assert_user_error(proc, *fragments)
        assert not glob.glob(str(tmp_path / "**" / "*.npz"), recursive=True)


def test_bad_inputs_in_process(ckpt, tmp_path, capsys):
    not_ckpt = tmp_path / "notckpt"
    not_ckpt.mkdir()
    cases = [
        (["--path", str(not_ckpt)], "not a quantized checkpoint directory"),
        (["--path", str(tmp_path / "missing")], "not a quantized checkpoint directory"),
        (["--weight-bit", "4"], "--path"),  # bit flags need a quantized checkpoint
        (["--per-proc-batch-size", "0"], "--per-proc-batch-size"),
        (["--num-fid-samples", "-3"], "--num-fid-samples"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA"))
    for extra, fragment in cases:
        flags = _flags(ckpt, tmp_path / "out", steps=3)
        if "--path" in extra:  # a quantized checkpoint is self-contained: no --ckpt
            i = flags.index("--ckpt")
            del flags[i:i + 2]
        with pytest.raises(SystemExit) as e:
            _main(flags + extra)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), err
        assert fragment in err, err
    assert not glob.glob(str(tmp_path / "**" / "*.npz"), recursive=True)


# ------------------------------------------------------------------ --backend int

def test_backend_int_samples_like_fake(qdir, tmp_path):
    """The integer backend draws the images of fake quantization: layer outputs agree to float rounding, so
    only an activation code that sits on a rounding boundary can flip (and the flip propagates)."""
    fake = np.load(_main(_qflags(qdir[0], tmp_path / "f")))["arr_0"]
    npz = _main(_qflags(qdir[0], tmp_path / "i", "--backend", "int"))
    assert os.path.basename(npz).endswith("-W4A8-ditas-int.npz")
    real = np.load(npz)["arr_0"]
    assert real.shape == fake.shape and real.dtype == np.uint8
    diff = np.abs(real.astype(int) - fake.astype(int))
    assert diff.mean() < 0.5 and (diff == 0).mean() > 0.9, (diff.mean(), (diff == 0).mean())


def test_backend_int_without_integer_form_is_user_error(tmp_path, capsys):
    import quant.io.checkpoint
    meta = dict(META, scheme="reference", act_granularity="tensor")
    path = quant.io.checkpoint.save_quantized(_quantized_dit("reference"), meta, {}, str(tmp_path / "ref"))
    cases = [(_qflags(path, tmp_path / "s", "--backend", "int"), ["no integer form", "--backend fake"]),
             (_qflags(path, tmp_path / "s", "--backend", "int")[2:], ["--backend int", "--path"])]
    for argv, fragments in cases:
        with pytest.raises(SystemExit) as e:
            _main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), err
        assert all(f in err for f in fragments), err
    assert not glob.glob(str(tmp_path / "**" / "*.npz"), recursive=True)


def test_dtype_bf16_fp_and_int_backend(ckpt, qdir, tmp_path, capsys):
    """--dtype bf16: FP models and the int backend sample in bf16 (close to fp32, own file name);
    with fake quantization it is a one-line error before anything is loaded."""
    fp32 = np.load(_main(_flags(ckpt, tmp_path / "a", steps=3)))["arr_0"]
    npz = _main(_flags(ckpt, tmp_path / "b", steps=3) + ["--dtype", "bf16"])
    assert os.path.basename(npz).endswith("-fp-bf16.npz")
    bf16 = np.load(npz)["arr_0"]
    assert bf16.shape == fp32.shape and 0 < np.abs(bf16.astype(int) - fp32.astype(int)).mean() < 2
    fake = np.load(_main(_qflags(qdir[0], tmp_path / "c")))["arr_0"]
    npz = _main(_qflags(qdir[0], tmp_path / "d", "--backend", "int", "--dtype", "bf16"))
    assert os.path.basename(npz).endswith("-W4A8-ditas-int-bf16.npz")
    assert np.abs(np.load(npz)["arr_0"].astype(int) - fake.astype(int)).mean() < 2
    calls = len(qdir[1])
    capsys.readouterr()  # drop the progress bars so far
    with pytest.raises(SystemExit) as e:
        _main(_qflags(qdir[0], tmp_path / "e", "--dtype", "bf16"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--backend int" in err, err
    assert len(qdir[1]) == calls and not glob.glob(str(tmp_path / "e" / "*.npz"))
