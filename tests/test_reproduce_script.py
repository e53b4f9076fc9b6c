"""scripts/reproduce_paper.sh and scripts/collect_table.py, without DiT-XL/2 or a GPU.

The smoke run substitutes a tiny DiT (random weights), 16 px, 8 samples, 2 steps and the digits
features, so the same stages run on CPU: QuantDiT.py -> sample_merge_TAS.py -> evaluator.py ->
collect_table.py.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "reproduce_paper.sh")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import collect_table  # noqa: E402


def sh(*args, env=None, timeout=300):
    full_env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(["bash", SCRIPT, *map(str, args)], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def test_bash_syntax():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


def test_dry_run_lists_the_paper_setting(tmp_path):
    proc = sh("--dry-run", "--out", tmp_path / "paper", "--nproc", 8)
    assert proc.returncode == 0, proc.stderr
    cmds = [l[2:] for l in proc.stdout.splitlines() if l.startswith("+ ")]
    quant = [c for c in cmds if "QuantDiT.py" in c]
    sample = [c for c in cmds if "sample_merge_TAS.py" in c]
    evals = [c for c in cmds if "evaluator.py" in c]
    # 2 sizes x 2 step counts x 2 bit widths x 2 schemes; FP on top for sampling and evaluation
    assert len(quant) == 16 and len(sample) == 20 and len(evals) == 20
    assert all("--nproc_per_node=8" in c and "--num-fid-samples 10000" in c and "--cfg-scale 1.5" in c for c in sample)
    assert sum("DiT-XL-2-512x512.pt" in c for c in quant) == 8
    assert any("--weight-bit 4 --act-bit 8 --scheme reference" in c and "--num-sampling-steps 100" in c for c in quant)
    assert sum("VIRTUAL_imagenet256_labeled.npz" in c for c in evals) == 10
    assert sum("VIRTUAL_imagenet512.npz" in c for c in evals) == 10
    assert all("--features inception" in c for c in evals)
    assert "collect_table.py" in cmds[-1]


def test_missing_inputs_fail_early(tmp_path):
    proc = sh("--out", tmp_path / "paper", "--ckpt-dir", tmp_path / "none")
    assert proc.returncode == 2 and "DiT-XL-2-256x256.pt not found" in proc.stderr


def _fabricate(tmp_path):
    d = tmp_path / "metrics"
    d.mkdir()
    fid = {"fp": 5.2, "W8A8-ditas": 5.3, "W4A8-ditas": 9.1, "W4A8-reference": 9.4}
    for size in (256, 512):
        for steps in (50, 100):
            for method, f in fid.items():
                batch = f"samples/DiT-XL-2-size-{size}-vae-ema-cfg-1.5-seed-0-steps-{steps}-{method}.npz"
                m = {"fid": f * size / 256 * 50 / steps, "sfid": 6.0, "inception_score": 200.0, "precision": 0.7,
                     "recall": 0.6, "features": "inception", "num_samples": 10000, "sample_batch": batch}
                (d / f"{size}-{steps}-{method}.json").write_text(json.dumps(m))
    (d / "other.json").write_text(json.dumps({"fid": 1.0, "sample_batch": "mine.npz"}))
    return d


def test_collect_table_on_fabricated_jsons(tmp_path, capsys):
    d = _fabricate(tmp_path)
    out = tmp_path / "table.md"
    assert collect_table.main([str(d), "--out", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    lines = text.splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith("| method |"))
    assert lines[head] == "| method | 256px, 50 steps | 256px, 100 steps | 512px, 50 steps | 512px, 100 steps |"
    assert [l.split(" |")[0] for l in lines[head + 2:head + 6]] == ["| fp", "| W8A8-ditas", "| W4A8-ditas",
                                                                    "| W4A8-reference"]
    w4 = lines[head + 4]
    assert "9.10 (9.05)" in w4 and "4.55 (6.86)" in w4 and "18.20 (17.92)" in w4 and "9.10 (13.45)" in w4
    assert "(" not in lines[head + 2]  # no published FP number
    assert "| 512 | 100 | W4A8-reference | 9.40 | 6.00 | 200.00 | 0.700 | 0.600 | 10000 |" in text
    assert "Skipped:" in text and "other.json" in text


def test_collect_table_without_metrics_is_an_error(tmp_path, capsys):
    assert collect_table.main([str(tmp_path)]) == 2
    assert "no evaluator JSON" in capsys.readouterr().err


@pytest.fixture
def tiny_ckpt(tmp_path):
    from models import DiT_models
    torch.manual_seed(0)
    m = DiT_models["DiT-XS/2"](input_size=16, in_channels=3, num_classes=10)
    with torch.no_grad():  # break adaLN-Zero's identity blocks so quantization changes the samples
        for n, p in m.named_parameters():
            if n != "pos_embed":
                p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "xs16.pt"
    torch.save(m.state_dict(), path)
    return path


def test_smoke_runs_every_stage(tmp_path, tiny_ckpt):
    out = tmp_path / "smoke"
    args = ["--smoke", "--smoke-model", "DiT-XS/2", "--smoke-ckpt", tiny_ckpt, "--out", out, "--bits", "W4A8",
            "--steps", "2", "--num-samples", "8", "--batch", "4",
            "--quant-extra",
            "--smoothing search --alpha-step 0.5 --lora-rank 2 --lora-iters 1 --no-preview --group-size 32"]
    proc = sh(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out / "metrics")) == ["16px-2steps-W4A8-ditas.json", "16px-2steps-W4A8-reference.json",
                                                   "16px-2steps-fp.json"]
    for name in os.listdir(out / "metrics"):
        m = json.loads((out / "metrics" / name).read_text())
        assert m["features"] == "digits" and m["num_samples"] == 8
    table = (out / "table.md").read_text()
    assert "| fp |" in table and "| W4A8-ditas |" in table and "| W4A8-reference |" in table
    assert "16px, 2 steps" in table
    # quantization changed the samples (the same noise, so FP and W4A8 would otherwise coincide)
    fids = {n: json.loads((out / "metrics" / n).read_text())["fid"] for n in os.listdir(out / "metrics")}
    assert len(set(fids.values())) > 1, fids
