"""Quality study on the bundled digits DiT: what each part of DiTAS buys, at W8A8 and W4A8, per scheme.

    python bench/quality.py [--num-samples 1000 --steps 50 --seeds 0 1 2 --bits W8A8 W4A8 \
        --schemes ditas reference] [--quick]

Rows, for every bit width and scheme (the quantized rows all from QuantDiT.py's flags):

    FP                      the full-precision model
    RTN                     --smoothing none --lora-rank 0      (round-to-nearest, no smoothing)
    TAS alpha=0.5, no LoRA  --smoothing fixed --alpha 0.5 --lora-rank 0
    TAS searched, no LoRA   --smoothing search --lora-rank 0
    DiTAS                   --smoothing search (LoRA rank 32: the full method)
    DiTAS + per-token       ... --act-granularity token (a finer dynamic range than the paper's)

(the no-LoRA rows use --lora-rank 0 to isolate smoothing). Columns: FID-digits and IS-digits
(evaluator.evaluate, digits features, against assets/digits_ref.npz), the fraction the bundled
classifier assigns to the conditioning label, and the mean PSNR of each sample against the FP
sample from the same noise (same global seed and index). Every number is mean +- standard
deviation over the sampling seeds (--seeds), with the same quantized checkpoint.

Everything runs in this process (QuantDiT.main, sample_merge_TAS.main, evaluator.evaluate):
torch is imported once. Quantized checkpoints are cached in results/bench/ckpt/ (keyed by the
FP checkpoint's content and the flags) and sample batches in results/bench/samples/ (the
sampler's own resumable shards), so a rerun only computes what is missing. Writes
bench/results/quality.md and bench/results/quality.json.
"""
import argparse
import json
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from study import (DEFAULT_METHODS, FULL, METHODS, PSNR_CAP_DB, QUICK, ROOT, Bench, fmt, log, machine,  # noqa: E402
                   parse_bits)
import threads  # noqa: E402
import torch  # noqa: E402
from bundled.digits import BUNDLED_CKPT  # noqa: E402


def run_rows(bench, settings, methods, seeds, n, steps, fp=True):
    """{row key: {"label", "bits", "scheme", "method", "ckpt", "per_seed": [metrics...]}} (FP first)."""
    rows = {"real": {"label": f"real digits ({n} drawn from the reference per seed)", "bits": None, "scheme": None,
                     "method": "real", "ckpt": None, "per_seed": [bench.score_real(n, s) for s in seeds]}}
    fp_images = {}
    for seed in seeds:
        fp_images[seed] = bench.samples(None, seed, n, steps)
    if fp:
        rows["FP"] = {"label": "FP", "bits": None, "scheme": None, "method": "fp", "ckpt": bench.ckpt,
                      "per_seed": [bench.score(fp_images[s], s) for s in seeds]}
        log(f"FP: {summary(rows['FP'])}")
    for bits, schemes in settings.items():
        for scheme in schemes:
            for method in methods:
                qdir = bench.checkpoint(bits, scheme, method, steps)
                per_seed = [bench.score(bench.samples(qdir, s, n, steps), s, fp_images[s]) for s in seeds]
                key = f"W{bits[0]}A{bits[1]} {scheme} {method}"
                rows[key] = {"label": METHODS[method][0], "bits": list(bits), "scheme": scheme, "method": method,
                             "ckpt": qdir, "per_seed": per_seed}
                log(f"{key}: {summary(rows[key])}")
    return rows


def summary(row):
    ps = row["per_seed"]
    parts = [f"FID {fmt([p['fid'] for p in ps])}", f"acc {fmt([p['label_acc'] for p in ps], 1, 100)}%"]
    if "psnr" in ps[0]:
        parts.append(f"PSNR {fmt([p['psnr'] for p in ps])}")
    return ", ".join(parts)


def calib_time(qdir):
    try:
        with open(os.path.join(qdir, "report.json")) as f:
            return json.load(f)["timings"].get("total_s")
    except (OSError, ValueError, KeyError):
        return None


def table(rows):
    lines = ["| setting | method | FID-digits ↓ | IS-digits ↑ | classified as label ↑ | PSNR vs FP (dB) ↑ | "
             "calibration (s) |", "|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        ps = r["per_seed"]
        setting = {"real": "data", "fp": "FP"}.get(r["method"]) or f"W{r['bits'][0]}A{r['bits'][1]} {r['scheme']}"
        ct = calib_time(r["ckpt"]) if r["bits"] is not None else None
        lines.append(f"| {setting} | {r['label']} | {fmt([p['fid'] for p in ps])} | {fmt([p['is'] for p in ps])} | "
                     f"{fmt([p['label_acc'] for p in ps], 1, 100)} % | "
                     f"{fmt([p['psnr'] for p in ps]) if 'psnr' in ps[0] else '-'} | "
                     f"{'-' if ct is None else f'{ct:.0f}'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=None, help=f"samples per row and seed "
                   f"(default {FULL['num_samples']}; --quick {QUICK['num_samples']})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"DDPM steps for sampling and calibration (default {FULL['steps']}; --quick {QUICK['steps']})")
    p.add_argument("--calib-steps", type=int, default=None,
                   help="calibration steps if different from --steps (the paper calibrates at the sampling steps)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds (global seed)")
    p.add_argument("--bits", type=parse_bits, nargs="+", default=[(8, 8), (4, 8)], help="e.g. W8A8 W4A8")
    p.add_argument("--schemes", nargs="+", choices=("ditas", "reference"), default=["ditas", "reference"])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    p.add_argument("--quick", action="store_true", help="the reduced setting: "
                   f"{QUICK['num_samples']} samples, {QUICK['steps']} steps (explicit flags win)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="sampling guidance (the paper's 1.5)")
    p.add_argument("--batch-size", type=int, default=100)
    threads.add_threads_arg(p)
    p.add_argument("--ckpt", default=BUNDLED_CKPT, help="the FP digits DiT (default: the bundled asset)")
    p.add_argument("--results-dir", default=os.path.join("results", "bench"))
    p.add_argument("--out", default=os.path.join("bench", "results", "quality.md"))
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    n = args.num_samples or base["num_samples"]
    steps = args.steps or base["steps"]
    os.chdir(ROOT)
    threads.set_threads(args.threads)
    torch.set_grad_enabled(False)
    if not os.path.isfile(args.ckpt):
        sys.exit(f"error: {args.ckpt} not found (the bundled model; pass --ckpt results/train/last.pt while it "
                 f"trains)")
    t_start = time.time()
    bench = Bench(args.ckpt, args.results_dir, args.cfg_scale, args.batch_size, args.calib_steps)
    settings = {tuple(b): list(args.schemes) for b in args.bits}
    rows = run_rows(bench, settings, args.methods, args.seeds, n, steps)
    wall = time.time() - t_start

    command = "python bench/quality.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    calib = args.calib_steps or steps
    text = "\n".join([
        "# Quality study: what each part of DiTAS buys (bundled digits DiT-T/2)", "",
        f"Command: `{command}`", "",
        f"Model: `{args.ckpt}` (sha256 {bench.digest}…), {n} samples per row and seed, {steps} DDPM steps, "
        f"cfg {args.cfg_scale}, sampling seeds {' '.join(map(str, args.seeds))}; calibration: QuantDiT.py "
        f"defaults (16 labels, cfg 1.5, seed 1) at {calib} steps. "
        f"Machine: {machine()}. Wall time {wall / 60:.1f} min (cached stages excluded).", "",
        "Each cell: mean ± standard deviation over the sampling seeds (same quantized checkpoint). "
        "FID-digits / IS-digits: evaluator.evaluate with the bundled digit classifier's features against "
        f"the 1797 real digits (assets/digits_ref.npz); the first row, {n} real digits drawn from that batch, "
        "is the floor at this N. PSNR: per sample against the FP sample from the same noise and label, "
        f"averaged (identical images count as {PSNR_CAP_DB:g} dB). "
        "The no-LoRA rows use --lora-rank 0 to isolate smoothing; ditas quantizes activations per batch row "
        "and reference per tensor unless the row says per-token. Calibration (s): QuantDiT's total time "
        "for that checkpoint.", "",
        table(rows), "",
    ])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"command": command, "num_samples": n, "steps": steps, "calib_steps": calib,
                   "cfg_scale": args.cfg_scale, "seeds": args.seeds, "ckpt": args.ckpt, "ckpt_sha256": bench.digest,
                   "machine": machine(), "wall_s": wall, "timings": bench.timings, "rows": rows}, f, indent=1)
    print(text)
    for k, v in bench.timings.items():
        print(f"  {v:7.1f}s  {k}")
    return rows


if __name__ == "__main__":
    main()
