"""The inference benchmark runs end to end on a tiny model and writes a well-formed table."""
import json

from helpers import run_script


def test_inference_bench_smoke(tmp_path):
    out = tmp_path / "inference.md"
    variants = "fp32,bf16,fake W4A8,int W8A8 per-channel,int W4A8"
    proc = run_script("bench/inference.py", "--models", "DiT-XS/2", "--image-size", "64", "--batches", "1,2",
                      "--reps", "1", "--threads", "1", "--group-size", "32", "--variants", variants, "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["batch"], r["variant"]) for r in rows] == [(b, v) for b in (1, 2) for v in variants.split(",")]
    for r in rows:
        assert r["ms"] > 0 and abs(r["images_per_s"] - r["batch"] / (50 * r["ms"] / 1e3)) < 1e-9
        assert r["tokens"] == 16 and r["weights_mb"] > 0
    bf16 = [r for r in rows if r["variant"] == "bf16"]
    assert all(r["vs_bf16"] == 1.0 for r in bf16)
    fp32 = {r["batch"]: r["weights_mb"] for r in rows if r["variant"] == "fp32"}
    assert all(abs(r["weights_mb"] - fp32[r["batch"]] / 2) < 1e-6 for r in bf16)  # every tensor halves
    table = out.read_text().splitlines()
    assert sum(line.startswith("| DiT-XS/2 |") for line in table) == len(rows)


def test_inference_bench_rejects_unknown_variant(tmp_path):
    proc = run_script("bench/inference.py", "--models", "DiT-XS/2", "--variants", "int W2A2",
                      "--out", tmp_path / "x.md")
    assert proc.returncode == 2 and "unknown variant" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_busy_bench_smoke(tmp_path):
    """bench/busy.py: a quiet and a busy calibration, CPU and wall seconds, the ratio column."""
    out = tmp_path / "busy.md"
    proc = run_script("bench/busy.py", "--steps", "2", "--busy", "1", "--settings", "ours", "--out", out,
                      "--quantdit-flags=--lora-rank 0 --alpha-step 0.5", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = [line for line in out.read_text().splitlines() if line.startswith("| ours |")]
    assert len(row) == 1
    cells = [c.strip().strip("*x") for c in row[0].strip("|").split("|")]
    quiet_cpu, busy_cpu, ratio = float(cells[2]), float(cells[4]), float(cells[5])
    assert quiet_cpu > 0 and busy_cpu > 0 and abs(ratio - busy_cpu / quiet_cpu) <= 0.05 * ratio + 0.01  # rounded cells


def test_inference_bench_cuda_without_gpu_is_one_line(tmp_path):
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    proc = run_script("bench/inference.py", "--device", "cuda", "--models", "DiT-XS/2", "--out", tmp_path / "x.md")
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
