"""The inference benchmark runs end to end on a tiny model and writes a well-formed table."""
import json
import os

import numpy as np

from helpers import assert_user_error, run_script


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


def test_inference_weights_count_every_tensor_a_layer_keeps_once():
    """bench/inference.py's 'weights MB': parameters, buffers persistent or not, tensors in plain attributes
    (prepared kernel operands, also inside a dataclass), each storage once (a view or a shared tensor)."""
    import torch
    from dataclasses import dataclass
    from bench.measure import model_bytes

    @dataclass
    class Ops:
        w: torch.Tensor
        extra: torch.Tensor

    lin = torch.nn.Linear(10, 20)
    lin.register_buffer("scratch", torch.zeros(5), persistent=False)
    lin.ops = Ops(lin.weight.data, torch.zeros(7, dtype=torch.int8))  # the weight again and an int8 operand
    lin.rows = lin.weight.data[:3]  # a view of the weight
    assert model_bytes(torch.nn.Sequential(lin)) == 4 * (200 + 20 + 5) + 7


def test_inference_bench_rejects_unknown_variant(tmp_path):
    proc = run_script("bench/inference.py", "--models", "DiT-XS/2", "--variants", "int W2A2",
                      "--out", tmp_path / "x.md")
    assert proc.returncode == 2 and "unknown variant" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_busy_bench_smoke(tmp_path):
    """bench/studies/busy.py: a quiet and a busy calibration, CPU and wall seconds, the ratio column."""
    out = tmp_path / "busy.md"
    proc = run_script("bench/studies/busy.py", "--steps", "2", "--busy", "1", "--settings", "default", "--out", out,
                      "--quantdit-flags=--lora-rank 0 --smoothing search --alpha-step 0.5", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = [line for line in out.read_text().splitlines() if line.startswith("| default |")]
    assert len(row) == 1
    cells = [c.strip().strip("*x") for c in row[0].strip("|").split("|")]
    quiet_cpu, busy_cpu, ratio = float(cells[3]), float(cells[6]), float(cells[7])
    assert cells[1] in ("PASSIVE", "spin-then-sleep") and cells[4] == "PASSIVE"  # busy at start: threads sleep
    assert quiet_cpu > 0 and busy_cpu > 0 and abs(ratio - busy_cpu / quiet_cpu) <= 0.05 * ratio + 0.01  # rounded cells


def test_inference_bench_cuda_without_gpu_is_one_line(tmp_path):
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    proc = run_script("bench/inference.py", "--device", "cuda", "--models", "DiT-XS/2", "--out", tmp_path / "x.md")
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_candidate_fits_bench_quick(tmp_path):
    """bench/studies/candidate_fits.py --quick: both tables, and the alpha-equality share is a percentage."""
    import re
    out = tmp_path / "candidate_fits.md"
    proc = run_script("bench/studies/candidate_fits.py", "--quick", "--threads", "1", "--out", out, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert "## A. Quality" in text and "## B. Cost at DiT-XL/2 shapes" in text and "## C. What equal alphas" in text
    row = [line for line in text.splitlines() if line.startswith("| bundled DiT-T/2")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    pct = float(re.fullmatch(r"\d+ \(([\d.]+)%\).*", cells[3]).group(1))
    assert 0 <= pct <= 100
    assert json.loads(out.with_suffix(".json").read_text())["quality"][0]["layers"] == 32


def test_candidate_fits_refit_table():
    """Table C: per k, the layers whose exhaustive alpha (argmin of the full-SVD losses) is among the k best of the
    default fits' exact losses; the cost is the default fits plus k reference fits, over the reference fits (table B's
    seconds per block)."""
    from bench.studies.fits import fmt_refit
    layers = {"m": {"a": dict(losses_exact={"0.0": 3.0, "0.5": 1.0, "1.0": 2.0},
                              losses_full={"0.0": 1.0, "0.5": 2.0, "1.0": 3.0}),  # exhaustive 0.0: 3rd of the default
                    "b": dict(losses_exact={"0.0": 2.0, "0.5": 1.0, "1.0": 3.0},
                              losses_full={"0.0": 2.0, "0.5": 1.5, "1.0": 3.0})}}  # exhaustive 0.5: 1st
    lines, rank = fmt_refit(layers, dict(ditas=2.0, reference=5.0), ks=(1, 3))
    assert rank == {"m": [2, 0]}
    rows = [line for line in lines if line.startswith("| 1 |") or line.startswith("| 3 |")]
    assert rows == ["| 1 | 1/2 (50%) | 1.40x |", "| 3 | 2/2 (100%) | 3.40x |"]
    assert "(table B not run)" in fmt_refit(layers, None, ks=(1,))[0][-1]


def test_stolen_seconds_reads_the_steal_column(tmp_path):
    """bench.common.stolen_seconds: the 8th value of /proc/stat's "cpu" (or "cpuN") line in seconds; None without
    the file or the line."""
    from bench.common import stolen_seconds, stolen_share
    stat = tmp_path / "stat"
    stat.write_text(f"cpu  10 0 20 30 1 0 2 {3 * os.sysconf('SC_CLK_TCK')} 0 0\ncpu0 5 0 10 15 0 0 1 0 0 0\n")
    assert stolen_seconds(stat) == 3.0 and stolen_seconds(stat, "cpu0") == 0.0
    assert stolen_seconds(stat, "cpu7") is None
    assert stolen_seconds(tmp_path / "none") is None
    assert stolen_share(None, 1.0) is None  # no starting value: nothing to compare


def test_compare_reports(tmp_path):
    """bench/scale.py --compare: equal alphas, output error ratios and losses at shared alphas of two reports;
    a missing report or other layers: one line, exit 2."""
    def report(name, layers):
        d = tmp_path / name
        d.mkdir()
        (d / "report.json").write_text(json.dumps({"layers": layers}))
        return d
    a = report("a", {"l1": {"alpha": 0.5, "output_error": 2.0, "search_losses": {"0.5": 2.0, "0.6": 4.0}},
                     "l2": {"alpha": 0.1, "output_error": 1.0, "search_losses": {"0.1": 1.0}}})
    b = report("b", {"l1": {"alpha": 0.5, "output_error": 2.2, "search_losses": {"0.5": 2.2, "0.7": 3.0}},
                     "l2": {"alpha": 0.2, "output_error": 0.9, "search_losses": {"0.2": 0.9}}})
    proc = run_script("bench/scale.py", "--compare", a, b)
    assert proc.returncode == 0, proc.stderr
    row = [c.strip() for c in proc.stdout.splitlines()[-1].strip("|").split("|")]
    # l1: +10 %, l2: -10 %; the one shared alpha (l1's 0.5): 10 %
    assert row[2:] == ["2", "1", "+0.00% (-10.00% / +10.00%)", "10.00% / 10.00% (1)"], row
    assert_user_error(run_script("bench/scale.py", "--compare", a, tmp_path), "not a QuantDiT report")
    c = report("c", {"l1": {"alpha": 0.5, "output_error": 2.0, "search_losses": {"0.5": 2.0}}})
    assert_user_error(run_script("bench/scale.py", "--compare", a, c), "other layers (2 and 1, 1 in one only)")


def test_launcher_overhead_bench_smoke(tmp_path):
    """bench/studies/launcher_overhead.py: the launcher's phases fit in its wall time, one row per repeat of the
    loops; a zero count is one line, exit 2."""
    out = tmp_path / "lo.md"
    proc = run_script("bench/studies/launcher_overhead.py", "--repeats", "1", "--nproc", "1", "--loops", "1",
                      "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = out.read_text().splitlines()
    i = lines.index('| `python -c "import torch"` | wall | to workers | imports | gloo init | after workers |')
    cells = [float(c.split(" / ")[0]) for c in lines[i + 2].strip("|").split("|")]
    assert all(c >= 0 for c in cells) and sum(cells[2:]) <= cells[1], cells
    rows = [line for line in lines if line.startswith("| ") and line.endswith("|") and "x |" in line]
    assert len(rows) == 1 and rows[0].count("x") == 1, rows  # one copy: one ratio
    assert_user_error(run_script("bench/studies/launcher_overhead.py", "--loops", "0", "--out", out), "at least 1")


def test_state_parts_bench_sums_the_budget_of_every_layer():
    """bench/scale.py --state-parts: per part, the budget's bytes summed over the model's layers, for QuantDiT's
    config."""
    from models import DiT_models
    from quant.calibration.budget import layer_state_bytes
    from quant.quant_config import QuantConfig
    from quant.method.layers import quantizable_layers
    proc = run_script("bench/scale.py", "--state-parts", "--model", "DiT-XS/2", "--extra",
                      "--smoothing search --search exact --weight-bit 8")
    assert "search exact, MiB" in proc.stdout, proc.stdout
    assert proc.returncode == 0, proc.stderr
    rows = {r[0]: [float(c) for c in r[1:]] for r in
            ([c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
             if line.startswith("| cpu") or line.startswith("| cuda"))}
    cfg = QuantConfig(scheme="ditas", smoothing="search", search="exact", weight_bit=8)
    layers = quantizable_layers(DiT_models["DiT-XS/2"](input_size=4, in_channels=4, num_classes=1000))
    for device, cells in rows.items():
        want = sum(layer_state_bytes(*lin.weight.shape, cfg, device) for lin in layers.values()) / 2 ** 20
        assert want > 1 and cells[-2] == round(want, 3) and abs(sum(cells[:-2]) - cells[-2]) <= 0.003, (device, cells)
        assert cells[-1] == 0  # of which host: the exact search keeps no per-step ranges
    assert set(rows) == {"cpu", "cuda"}
    proc = run_script("bench/scale.py", "--state-parts", "--model", "DiT-XS/2", "--steps", "20", "--image-size", "32",
                      "--extra", "--smoothing search")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| c")]
    # the shortlist's ranges: 2 x 32 x C floats a step, in 16-step blocks
    host = {r[0]: [float(c) for c in r[1:]] for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}
    c = sum(lin.weight.shape[1] for lin in layers.values())
    assert host["cuda"][-1] == host["cuda"][-3] == round(4 * 2 * 32 * c * 32 / 2 ** 20, 3) and host["cpu"][-1] == 0
    assert_user_error(run_script("bench/scale.py", "--state-parts", "--model", "DiT-Q/2"), "unknown --model")


def test_scale_bench_smoke(tmp_path):
    """bench/scale.py: one QuantDiT run on a random DiT-S/2 (1 token), its row, the projection rows, the probe."""
    from bench.scale_report import COLUMNS, PROBE_COLUMNS, PROJECTION_COLUMNS
    out = tmp_path / "scale.md"
    proc = run_script("bench/scale.py", "--model", "DiT-S/2", "--image-size", "16", "--steps", "2", "--schemes",
                      "reference", "--threads", "1", "--extra", "--lora-rank 0 --smoothing none", "--cache",
                      tmp_path / "cache", "--probe-full", "4", "--probe-block", "256", "--out", out, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # each setting its own directory: the extra flags are in its name
    assert (tmp_path / "cache" / "DiT-S-2-16-reference-lora-rank-0-smoothing-none" / "report.json").is_file()
    lines = out.read_text().splitlines()

    def rows(cols):  # the cells of the table with these columns
        from itertools import takewhile
        i = lines.index("| " + " | ".join(cols) + " |")
        body = [[c.strip() for c in line.strip("|").split("|")]
                for line in takewhile(lambda line: line.startswith("| "), lines[i + 2:])]
        assert body and all(len(r) == len(cols) for r in body), body
        return body

    run, = rows(COLUMNS)
    assert run[0] == "reference" and all(float(run[i]) > 0 for i in (5, 6, 7, 8))  # total, wall, CPU, peak RSS
    assert [r[:3] for r in rows(PROJECTION_COLUMNS)] == [["reference", "16", "1"], ["reference", "256", "256"],
                                                         ["reference", "512", "1024"]]
    data = json.loads(out.with_suffix(".json").read_text())
    for r in data["projection"]:  # a report with the calibration entry: every term known
        assert r["projected"] == r["model"] + r["state"] + r["activations"] and r["state"] > 0
    assert data["projection"][0]["measured"] == data["runs"]["reference"]["peak_rss_bytes"] > 0
    probe = rows(PROBE_COLUMNS)
    assert [r[:2] for r in probe] == [["whole model", "4"], ["one block", "256"]]
    assert 0.8 <= float(probe[1][5]) <= 1.25, probe  # the activation model where tensors dominate


def _bench_module(name):
    import importlib
    return importlib.import_module(f"bench.{name}")


def test_quality_bench_draws_and_paired_column(tmp_path):
    """bench/quality.py: every row per draw (calibration seed, sampling seed), FID - RTN paired within a draw,
    extra rows outside --schemes share their own setting, each draw's checkpoint carries its calibration seed."""
    out = tmp_path / "new" / "q.md"  # --out's folder is made, before the figure is written there
    proc = run_script("bench/quality.py", "--num-samples", "12", "--steps", "2", "--bits", "W4A8", "--schemes",
                      "ditas", "--methods", "rtn", "fixed", "--extra", "W4A8:reference:rtn", "W4A8:reference:fixed",
                      "--backend-check",
                      "--calib-seeds", "1", "2", "--seeds", "0", "1", "--threads", "1",
                      "--results-dir", tmp_path / "res", "--out", out, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["draws"] == [[1, 0], [2, 1]]
    rows = {r["key"]: r for r in data["rows"]}
    assert list(rows) == ["real", "FP", "W4A8 ditas rtn", "W4A8 ditas fixed", "W4A8 reference rtn",
                          "W4A8 reference fixed"]
    rtn, fixed = rows["W4A8 ditas rtn"], rows["W4A8 ditas fixed"]
    assert fixed["fid_minus_rtn"] == [f["fid"] - r["fid"] for f, r in zip(fixed["per_draw"], rtn["per_draw"])]
    assert "fid_minus_rtn" not in rtn and "fid_minus_rtn" not in rows["W4A8 reference rtn"]
    assert all(0 < p["psnr"] <= 80 and 0 <= p["label_acc"] <= 1 for p in rtn["per_draw"])
    # the two draws are two calibrations (QuantDiT --seed) and two sampling seeds
    ckpts = sorted((tmp_path / "res" / "ckpt").glob("W4A8-ditas-rtn-*"))
    assert [json.loads((c / "quant_config.json").read_text())["seed"] for c in ckpts] == [1, 2]
    assert rtn["per_draw"][0]["fid"] != rtn["per_draw"][1]["fid"]
    table = out.read_text()
    ref_rtn, ref_fixed = rows["W4A8 reference rtn"], rows["W4A8 reference fixed"]  # paired within their setting
    assert ref_fixed["fid_minus_rtn"] == [f["fid"] - r["fid"] for f, r in zip(ref_fixed["per_draw"],
                                                                                 ref_rtn["per_draw"])]
    # per setting: two rows in the main table and one component (alpha 0.5 against RTN)
    assert table.count("| W4A8 ditas |") == 3 and table.count("| W4A8 reference |") == 3
    assert table.count("(fixed − rtn) |") == 2
    assert "Integer vs fake backend" not in table


def test_quality_bench_rejects_unpaired_seeds(tmp_path):
    proc = run_script("bench/quality.py", "--calib-seeds", "1", "2", "--seeds", "0", "--out", tmp_path / "q.md")
    assert proc.returncode == 2 and "pair up into draws" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script("bench/quality.py", "--extra", "W4A8:ditas", "--out", tmp_path / "q.md")
    assert proc.returncode == 2 and "W4A8:ditas:approx" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "q.md").exists()


def test_quality_backend_table_pairs_fake_and_int():
    """The backend table: int - fake per sampling seed from the same checkpoint, and its mean and spread."""
    q = _bench_module("quality")
    res = {}
    for s, (f, i) in enumerate([(100.0, 101.5), (104.0, 103.0), (98.0, 99.5)]):
        res[("q", (8, 8), "ditas", "ditas", 1, s, "fake")] = {"fid": f, "psnr": 40.0}
        res[("q", (8, 8), "ditas", "ditas", 1, s, "int")] = {"fid": i, "psnr": 39.0, "psnr_vs_fake": 45.0}
    text, summary = q.backend_table(res, [((8, 8), "ditas")], 1, [0, 1, 2])
    assert text.count("| W8A8 ditas DiTAS |") == 3 and "| +1.50 |" in text and "| -1.00 |" in text
    (mean, std), = [summary[0]["int_minus_fake"]]
    assert abs(mean - 2.0 / 3) < 1e-12 and abs(std - np.std([1.5, -1.0, 1.5], ddof=1)) < 1e-12
    assert abs(summary[0]["fake_seed_spread"][1] - np.std([100.0, 104.0, 98.0], ddof=1)) < 1e-12


def test_quality_components_are_paired_differences():
    """The component table: row minus row of one setting per draw, improvements counted per draw."""
    q = _bench_module("quality")
    def row(method, fids, psnrs, bits=(4, 8), scheme="ditas"):
        return {"bits": list(bits), "scheme": scheme, "method": method,
                "per_draw": [{"fid": f, "psnr": p} for f, p in zip(fids, psnrs)]}
    rows = [{"key": "FP", "per_draw": []}, row("rtn", [150.0, 160.0], [30.0, 31.0]),
            row("fixed", [140.0, 165.0], [31.0, 31.5]), row("ditas", [130.0, 150.0], [33.0, 33.0]),
            row("rtn", [200.0, 210.0], [27.0, 27.0], scheme="reference")]
    text, summary = q.components_table(rows)
    got = {(c["setting"], c["rows"][0], c["rows"][1]): c for c in summary}
    assert set(got) == {("W4A8 ditas", "fixed", "rtn"), ("W4A8 ditas", "ditas", "rtn")}  # search row missing
    assert got[("W4A8 ditas", "fixed", "rtn")]["d_fid"] == [-10.0, 5.0]
    assert got[("W4A8 ditas", "ditas", "rtn")]["d_psnr"] == [3.0, 2.0]
    assert ("| W4A8 ditas | TAS smoothing at alpha 0.5 (fixed − rtn) | -2.50 ± 10.61 | 1/2 | 0.75 ± 0.35 | 2/2 |"
            in text)
    assert set(q.COST) == set(q.METHODS)  # every row has a place in the cells' order


def test_quality_worker_leaves_with_its_parent(tmp_path):
    """A quality.py worker whose parent is killed exits instead of going on with its queued cells."""
    import subprocess
    import sys
    import time
    from helpers import ROOT
    child = ("import os, sys; from bench import quality; "
             "open(sys.argv[1], 'w').write(str(os.getpid())); quality._exit_with(int(sys.argv[2]), 0.05)")
    parent = ("import os, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2], "
              "str(os.getpid())]); [time.sleep(0.1) for _ in range(600) if not os.path.exists(sys.argv[2])]")
    pid_file = tmp_path / "pid"
    subprocess.run([sys.executable, "-c", parent, child, str(pid_file)], cwd=ROOT, check=True, timeout=120)
    pid = int(pid_file.read_text())
    for _ in range(200):  # the parent is gone: the worker notices within its poll interval
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        raise AssertionError("the worker outlived its parent")


def test_bench_passes_its_threads_to_the_scripts(tmp_path, monkeypatch):
    """Bench runs QuantDiT.py and sample_merge_TAS.py in-process with the caller's thread count (their own
    default would take every core, oversubscribing quality.py --jobs N --threads 1)."""
    import torch
    from helpers import ROOT
    study = _bench_module("study")
    import QuantDiT
    import sample_merge_TAS
    from bundled.digits import BUNDLED_CKPT
    seen = {}

    def fake_sample(args):
        seen["sample"] = args.threads
        np.savez(tmp_path / "s.npz", np.zeros((1, 16, 16, 3), np.uint8))
        return str(tmp_path / "s.npz")
    monkeypatch.setattr(QuantDiT, "main", lambda args: seen.setdefault("quantize", args.threads))
    monkeypatch.setattr(sample_merge_TAS, "main", fake_sample)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bench = study.Bench(os.path.join(ROOT, BUNDLED_CKPT), str(tmp_path))
        bench.checkpoint((4, 8), "ditas", "rtn", 2)
        bench.samples(None, 0, 1, 2)
    finally:
        torch.set_num_threads(before)
    assert seen == {"quantize": 1, "sample": 1}


def test_calib_spread_swaps_whole_layers_between_seeds(tmp_path):
    """bench/calib_spread.py: a swapped checkpoint holds seed B's quantized layers of the swapped part (alpha in
    the meta too) and seed A's elsewhere, and loads back; alpha_changes lists exactly the layers that differ."""
    import torch
    import QuantDiT
    from models import DiT_models
    from quant.io.checkpoint import load_quantized
    spread = _bench_module("calib_spread")
    torch.manual_seed(0)
    ckpt = tmp_path / "xs.pt"
    torch.save(DiT_models["DiT-XS/2"](input_size=8, in_channels=3, num_classes=10).state_dict(), ckpt)
    dirs = {}
    for seed in (1, 2):
        dirs[seed] = QuantDiT.main(QuantDiT.build_parser().parse_args(
            ["--model", "DiT-XS/2", "--image-size", "8", "--num-classes", "10", "--vae", "none", "--ckpt", str(ckpt),
             "--num-sampling-steps", "2", "--calib-samples", "4", "--group-size", "32", "--lora-rank", "2",
             "--lora-iters", "2", "--smoothing", "search", "--alpha-step", "0.25", "--no-preview", "--threads", "1",
             "--seed", str(seed),
             "--out", str(tmp_path / f"s{seed}")]))
    out = spread.swapped_checkpoint(dirs[1], dirs[2], "mlp.fc2", str(tmp_path))
    (m, meta), (a, meta_a), (b, meta_b) = (load_quantized(d) for d in (out, dirs[1], dirs[2]))
    for name in meta["alphas"]:
        src, src_meta = (b, meta_b) if name.endswith("mlp.fc2") else (a, meta_a)
        assert meta["alphas"][name] == src_meta["alphas"][name]
        got, want = m.get_submodule(name).state_dict(), src.get_submodule(name).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), name
    per = {s: {"alphas": json.loads(open(os.path.join(d, "quant_config.json")).read())["alphas"]}
           for s, d in dirs.items()}
    changed = spread.alpha_changes(per)
    assert changed == {k: [per[1]["alphas"][k], per[2]["alphas"][k]] for k in per[1]["alphas"]
                       if per[1]["alphas"][k] != per[2]["alphas"][k]}
    assert spread.cycle_labels(12) == list(range(10)) + [0, 1]


def test_calib_spread_settings_are_quantdit_configs():
    """bench/calib_spread.py: every SETTINGS row's flags parse with QuantDiT.py on top of the bench's W4A8 ditas
    argv (a misspelled flag or choice fails here, not after an hour of cells), and the lower-error rows (issue 30)
    set exactly the QuantConfig fields they name, the rest staying the n16 row's."""
    import dataclasses
    import QuantDiT
    from ditas.quant_args import quant_config_from_args
    from quant import QuantConfig
    spread = _bench_module("calib_spread")
    bench = spread.SpreadBench.__new__(spread.SpreadBench)  # quant_argv needs only ckpt, calib_steps and extra
    bench.ckpt, bench.calib_steps = spread.BUNDLED_CKPT, None
    cfgs = {}
    for name, (_, steps, extra) in spread.SETTINGS.items():
        bench.extra = list(extra)
        args = QuantDiT.build_parser().parse_args(bench.quant_argv((4, 8), "ditas", "ditas", steps, calib_seed=1))
        cfgs[name] = dataclasses.asdict(quant_config_from_args(args))
        bits = 4 if name.startswith("a4-") else 8  # the W4A4 rows override the bench's act bits
        assert (args.weight_bit, args.act_bit, args.scheme, args.seed) == (4, bits, "ditas", 1), name
    base = cfgs["n16"]
    no_search = {"search": "exact", "search_shortlist": None}  # no alpha search: the shortlist default is not set
    want = {"svd": {"lora_order": "svd_first"},
            "svd-token": {"lora_order": "svd_first", "act_granularity": "token"},
            "token": {"act_granularity": "token"}, "r4": {"lora_rank": 4},
            "svd-r4": {"lora_order": "svd_first", "lora_rank": 4}, "rtn-lora": {"smoothing": "none", **no_search},
            "rtn-r4": {"smoothing": "none", "lora_rank": 4, **no_search},
            "n16-bc": {"bias_correction": True},
            "fixed-bc": {"smoothing": "fixed", "bias_correction": True, **no_search},
            "rtn-bc": {"smoothing": "none", "bias_correction": True, **no_search},
            **{f"a{a}-bc": {"smoothing": "fixed", "alpha": a, "bias_correction": True, **no_search}
               for a in (0.3, 0.4, 0.6)},
            "select": {"smoothing": "select", "bias_correction": True, **no_search},
            "a4-search": {"act_bit": 4},
            "a4-default": {"act_bit": 4, "smoothing": "fixed", "bias_correction": True, **no_search},
            "a4-svd-token": {"act_bit": 4, "lora_order": "svd_first", "act_granularity": "token"},
            "a4-svd-token-bc": {"act_bit": 4, "lora_order": "svd_first", "act_granularity": "token",
                                "bias_correction": True},
            "a4-default-svd-token": {"act_bit": 4, "smoothing": "fixed", "bias_correction": True,
                                     "lora_order": "svd_first", "act_granularity": "token", **no_search}}
    for name, fields in want.items():
        assert {k: v for k, v in cfgs[name].items() if base[k] != v} == fields, name
    # the base row is the paper's search without the correction; select is QuantDiT's default, fixed-bc was before
    assert (base["smoothing"], base["bias_correction"]) == ("search", False)
    assert cfgs["select"] == dataclasses.asdict(QuantConfig())
    assert cfgs["fixed-bc"] == dataclasses.asdict(QuantConfig(smoothing="fixed"))


def test_rounding_lottery_jitters_only_the_smoothing_factors(tmp_path):
    """bench/studies/rounding_lottery.py: eps 0 writes QuantDiT's fixed-bc checkpoint byte for byte; eps 0.01 moves
    every layer's smoothing factors by about 1 % (relative standard deviation) and re-rounds the weights."""
    import torch
    from bench.calib_spread import SETTINGS
    from bench.studies.rounding_lottery import JitterBench
    from quant.io.checkpoint import load_quantized
    from quant.method.layers import quantizable_layers
    bench = JitterBench("assets/dit_t2_digits16.safetensors", str(tmp_path))
    flags = SETTINGS["fixed-bc"][2] + ["--num-sampling-steps", "3", "--lora-iters", "2"]
    grad = torch.is_grad_enabled()  # (QuantDiT.main, run in-process, turns autograd off)
    try:
        plain, jittered = [bench.jittered(eps, 1, 1, flags) for eps in (0.0, 0.01)]
    finally:
        torch.set_grad_enabled(grad)
    proc = run_script("QuantDiT.py", *bench.quant_flags(1), *flags, "--threads", "1", "--out", tmp_path / "direct")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(plain, "model.safetensors"), "rb") as a, open(tmp_path / "direct" / "model.safetensors",
                                                                          "rb") as b:
        assert a.read() == b.read()
    a, b = (quantizable_layers(load_quantized(d)[0]) for d in (plain, jittered))
    for name, q in a.items():
        ratio = b[name].smooth / q.smooth - 1
        assert 0.003 < float(ratio.std()) < 0.03, name
        assert not torch.equal(q.codes, b[name].codes), name
