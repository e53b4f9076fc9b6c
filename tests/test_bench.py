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
