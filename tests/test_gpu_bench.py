"""bench/gpu.py, the prepared GPU check: its --dry-run (the same code on CPU, Triton's interpreter) writes every
section with numbers; a failing, overrunning or unaffordable section is reported and the others still run."""
import json
import time
import types

import pytest
import torch

from helpers import assert_one_line_error, call_main, run_script

pytest.importorskip("triton", reason="the dry run runs the Triton kernels in Triton's CPU interpreter")


def test_dry_run_reports_every_section(tmp_path):
    from bench.gpu import DRY, SECTIONS, TITLES
    out = tmp_path / "gpu.md"
    proc = run_script("bench/gpu.py", "--dry-run", "--threads", "1", "--out", out, "--work", tmp_path / "work",
                      env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    secs = data["sections"]
    assert list(secs) == list(SECTIONS) and all(s["status"] == "ok" and s["rows"] for s in secs.values()), secs
    text = out.read_text()
    for i, name in enumerate(SECTIONS, 1):
        assert f"## {i}. {TITLES[name]} (`{name}`: ok, " in text
    # check: Triton's activation codes are the quantizer's, outputs within the CPU tests' tolerances, 2 x 4 layers
    assert [r[-1] for r in secs["check"]["rows"]] == ["ok"] * 8 and {r[3] for r in secs["check"]["rows"]} == {"yes"}
    # gemm: every layer shape, bf16, both torch._int_mm layouts and the Triton cases, timed
    gemm = secs["gemm"]["data"]
    assert set(gemm) == {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
    for ms in gemm.values():
        assert {"torch._int_mm, B row-major (K, N)", "torch._int_mm, B column-major ((N, K).t())",
                "Triton GEMM W8A8", "Triton GEMM W4A8"} <= set(ms) and all(t > 0 for t in ms.values())
    # e2e: each batch and variant; bf16 is its own baseline; packed 4-bit layers hold less than 8-bit ones
    e2e = {(r["batch"], r["variant"]): r for r in secs["e2e"]["data"]}
    assert set(e2e) == {(b, v) for b in DRY.batches for v in ("bf16", "int W8A8", "int W4A8")}
    assert all(r["ms"] > 0 and r["weights_bytes"] >= r["linear_bytes"] > 0 for r in e2e.values())
    assert all(e2e[b, "bf16"]["vs_bf16"] == 1.0 for b in DRY.batches)
    assert e2e[1, "int W4A8"]["linear_bytes"] < e2e[1, "int W8A8"]["linear_bytes"]
    # torchrun: exit 0 and the .npz of 16 bundled-model samples; calib: a measured and a projected peak
    assert secs["torchrun"]["data"]["shape"] == [16, 16, 16, 3] and secs["torchrun"]["data"]["exit"] == 0
    assert secs["calib"]["data"]["measured_bytes"] > 0 and secs["calib"]["data"]["projected_bytes"] > 0
    targets = {t for t, _, _ in data["targets"]}
    assert "fc1 Triton GEMM W8A8 >= 1.6x bf16" in targets and "Triton int = fake (codes, tolerance)" in targets


def test_failing_overrunning_and_unaffordable_sections_are_reported():
    from bench.gpu import run_section, run_sections

    def boom(ctx):
        raise ValueError("bad shape\nsecond line")
    written = []
    results = run_sections(["check", "gemm"], {"check": boom, "gemm": lambda ctx: {"rows": [[ctx]]}}, 7, 100.0,
                           lambda r: written.append(dict(r)))
    assert results["check"]["status"] == "failed" and results["check"]["error"] == "ValueError: bad shape"
    assert results["gemm"]["status"] == "ok" and results["gemm"]["rows"] == [[7]]
    assert [list(w) for w in written] == [["check"], ["check", "gemm"]]  # the report after each section
    t0 = time.perf_counter()
    late = run_section(lambda ctx: time.sleep(30), None, 1)
    assert late["status"] == "failed" and "time cap of 1 s" in late["error"] and time.perf_counter() - t0 < 10
    skipped = run_sections(["e2e"], {"e2e": boom}, None, 2.0, lambda r: None)
    assert skipped["e2e"]["status"] == "skipped" and "time guard" in skipped["e2e"]["error"]


def test_weight_bytes_count_each_storage_once():
    """gpu.py's weight memory (bench/measure.py's model_bytes): operands held beside the layer's own tensors."""
    from bench.measure import model_bytes
    lin = torch.nn.Linear(4, 3)
    assert model_bytes(torch.nn.ModuleList([lin])) == (12 + 3) * 4
    lin.triton_ops = types.SimpleNamespace(w=torch.zeros(10, dtype=torch.int8), same=lin.weight, bound=(1, 2))
    lin.register_buffer("view", lin.bias[:2], persistent=False)  # a view of a parameter: no new bytes
    assert model_bytes(torch.nn.ModuleList([lin, lin])) == (12 + 3) * 4 + 10


def test_int_mm_layouts_compute_the_same_product():
    from bench.kernel_probe import int_mm_layouts
    cases = int_mm_layouts(32, 64, 48)
    row, col = (f() for f in cases.values())
    assert list(cases) == ["torch._int_mm, B row-major (K, N)", "torch._int_mm, B column-major ((N, K).t())"]
    assert row.dtype == torch.int32 and torch.equal(row, col) and row.abs().max() > 0


def test_bad_sections_and_no_gpu_are_one_line_errors(tmp_path):
    import bench.gpu as gpu
    code, err = call_main(gpu, "--dry-run", "--sections", "gemm,nope", "--out", tmp_path / "g.md")
    assert_one_line_error(code, err, "--sections gemm,nope", "check, gemm, e2e, torchrun, calib")
    if not torch.cuda.is_available():
        code, err = call_main(gpu, "--out", tmp_path / "g.md")
        assert_one_line_error(code, err, "no CUDA device", "--dry-run")
    assert not (tmp_path / "g.md").exists()
