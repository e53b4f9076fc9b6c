"""Question: does the one-pass approximate alpha search (quant/search/approx.py) choose as the exact search does,
and what does it save?

Answer (bench/results/approx_search.md): with the scheme's default activation ranges it picks the exact search's
alpha in every layer for ditas at W4A8 and W8A8 (byte-identical checkpoints); elsewhere a neighbouring alpha where
the loss is flat, at most 0.28 % more exact loss in any layer, sample quality within the seeds' spread (|dFID| <=
0.6, |dPSNR| <= 0.13 dB). One FP loop instead of two: the ditas calibration 1.8x faster back to back.

    python bench/studies/approx_search.py [--steps 10 --bits W4A8 W8A8 --num-samples 100 --seeds 0 1 2]
        [--schemes ditas reference] [--variants default token] [--retime]

For each bit width, scheme and variant (full DiTAS: searched alpha + LoRA r32, with the scheme's
default activation granularity or per-token) two checkpoints are made with identical calibration
(QuantDiT.py ... --search exact | approx; the exact one is quality.py's cached checkpoint). Both report.json files hold the loss of
every alpha of every layer (exact: measured in the second FP loop; approx: predicted), and the
candidates (smoothing factors, LoRA fits) are identical, so per layer we compare
  - the chosen alpha (same exactly / within +-0.05),
  - the exact loss at the approx-chosen alpha over the exact minimum (1.0 = no loss),
  - how well the predicted losses match the exact ones over all (layer, alpha) pairs,
then calibration wall time (QuantDiT's report timings), and FID-digits / label accuracy /
PSNR vs FP of samples from both checkpoints (same seeds). Writes bench/results/approx_search.md.
"""
import argparse
import json
import os
import shlex
import sys
import time

from ditas import threads  # first: sets OpenMP's wait policy, read when torch loads
import numpy as np
import torch

from bench import study
from bench.common import ROOT

from bundled.digits import BUNDLED_CKPT


# variant -> (exact method, approx method) of study.METHODS
VARIANTS = {"default": ("ditas", "approx"), "token": ("token", "approx-token")}


def same_file(a, b, name="model.safetensors"):
    import filecmp
    return filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False)


def load_report(qdir):
    with open(os.path.join(qdir, "report.json")) as f:
        return json.load(f)


def compare(exact, approx):
    """Per-layer comparison of two reports with the same candidates."""
    same = near = 0
    ratios, rel_errs, spearman = [], [], []
    for name, e in exact["layers"].items():
        a = approx["layers"][name]
        ea, aa = e["alpha"], a["alpha"]
        same += ea == aa
        near += ea is not None and aa is not None and abs(ea - aa) <= 0.05 + 1e-9
        el = e["search_losses"]
        ratios.append(el[str(aa)] / max(el[str(ea)], 1e-300))
        keys = list(el)
        ev = np.array([el[k] for k in keys])
        av = np.array([a["search_losses"][k] for k in keys])
        rel_errs.extend((av / np.maximum(ev, 1e-300) - 1).tolist())
        if len(keys) > 2:
            re, ra = ev.argsort().argsort(), av.argsort().argsort()
            spearman.append(float(np.corrcoef(re, ra)[0, 1]))
    n = len(exact["layers"])
    r = np.array(ratios)
    rel = np.abs(np.array(rel_errs))
    return {"layers": n, "same": int(same), "within_0.05": int(near),
            "ratio_mean": float(r.mean()), "ratio_median": float(np.median(r)), "ratio_max": float(r.max()),
            "total_ratio": float(sum(e["search_losses"][str(approx["layers"][k]["alpha"])]
                                     for k, e in exact["layers"].items())
                                 / sum(min(e["search_losses"].values()) for e in exact["layers"].values())),
            "pred_rel_err_median": float(np.median(rel)), "pred_rel_err_p90": float(np.quantile(rel, 0.9)),
            "spearman_median": float(np.median(spearman)) if spearman else float("nan")}


def retime(bench, bits_list, scheme, steps):
    """Calibrate exact and approx back to back (QuantDiT.main into a temporary dir): [(bits, {search: timings})]."""
    import shutil
    import tempfile

    import QuantDiT
    out = []
    for i, bits in enumerate(bits_list):
        timings = {}
        for m in (("exact", "approx") if i % 2 == 0 else ("approx", "exact")):
            argv = bench.quant_argv(bits, scheme, "ditas", steps) + ["--search", m]
            tmp = tempfile.mkdtemp(prefix="approx-retime-")
            try:
                d = QuantDiT.main(QuantDiT.build_parser().parse_args(argv + ["--out", os.path.join(tmp, "q")]))
                timings[m] = load_report(d)["timings"]
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            study.log(f"retime W{bits[0]}A{bits[1]} {m}: {timings[m]}")
        out.append((bits, timings))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=study.QUICK["steps"])
    p.add_argument("--calib-steps", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=study.QUICK["num_samples"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--bits", type=study.parse_bits, nargs="+", default=[(4, 8), (8, 8)])
    p.add_argument("--schemes", nargs="+", choices=("ditas", "reference"), default=["ditas"])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["default"],
                   help="default: the scheme's default activation granularity; token: per-token activations")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    threads.add_threads_arg(p)
    p.add_argument("--ckpt", default=BUNDLED_CKPT)
    p.add_argument("--results-dir", default=os.path.join("results", "bench"))
    p.add_argument("--out", default=os.path.join("bench", "results", "approx_search.md"))
    p.add_argument("--retime", action="store_true",
                   help="also time both calibrations back to back in this process (not cached; a fair wall-time "
                        "comparison on a shared machine)")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    threads.set_threads(args.threads)
    torch.set_grad_enabled(False)
    t_start = time.time()
    bench = study.Bench(args.ckpt, args.results_dir, args.cfg_scale, calib_steps=args.calib_steps)
    n, steps = args.num_samples, args.steps
    fp = {s: bench.samples(None, s, n, steps) for s in args.seeds}

    results = []
    for scheme in args.schemes:
        for variant in args.variants:
            exact_m, approx_m = VARIANTS[variant]
            for bits in args.bits:
                dirs = {"ditas": bench.checkpoint(bits, scheme, exact_m, steps),
                        "approx": bench.checkpoint(bits, scheme, approx_m, steps)}
                reps = {m: load_report(d) for m, d in dirs.items()}
                cmp = compare(reps["ditas"], reps["approx"])
                scores = {m: [bench.score(bench.samples(d, s, n, steps), s, fp[s]) for s in args.seeds]
                          for m, d in dirs.items()}
                label = f"W{bits[0]}A{bits[1]} {scheme}" + (" per-token" if variant == "token" else "")
                results.append({"label": label, "bits": bits, "scheme": scheme, "variant": variant, "dirs": dirs,
                                "compare": cmp, "scores": scores, "timings": {m: r["timings"] for m, r in reps.items()},
                                "same_weights": same_file(dirs["ditas"], dirs["approx"])})
                study.log(f"{label}: {cmp}")

    retimed = retime(bench, args.bits, args.schemes[0], steps) if args.retime else []

    command = "python bench/studies/approx_search.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    calib = args.calib_steps or steps
    lines = [
        "# Approximate alpha search (one FP loop) vs the exact search (two FP loops)", "",
        f"Command: `{command}`", "",
        f"Model `{args.ckpt}` (sha256 {bench.digest}…), full DiTAS (searched alpha, LoRA r32; activations per "
        f"batch row for ditas, per tensor for reference, unless per-token), calibration: QuantDiT.py defaults at {calib} steps. Sampling: {n} samples "
        f"per seed, {steps} steps, cfg {args.cfg_scale}, seeds {' '.join(map(str, args.seeds))}. "
        f"Machine: {study.machine()}.", "",
        "## Choice of alpha (per layer, exact losses from the exact run's report)", "",
        "| setting | layers | same alpha | within ±0.05 | exact-loss ratio at approx alpha: mean / median / max | "
        "summed over layers | predicted vs exact loss, all alphas: median / p90 abs. rel. error | "
        "Spearman over alphas (median layer) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c, b = r["compare"], r["bits"]
        lines.append(f"| {r['label']} | {c['layers']} | {c['same']} ({100 * c['same'] / c['layers']:.0f} %) | "
                     f"{c['within_0.05']} ({100 * c['within_0.05'] / c['layers']:.0f} %) | "
                     f"{c['ratio_mean']:.4f} / {c['ratio_median']:.4f} / {c['ratio_max']:.4f} | "
                     f"{c['total_ratio']:.4f} | {100 * c['pred_rel_err_median']:.1f} % / "
                     f"{100 * c['pred_rel_err_p90']:.1f} % | {c['spearman_median']:.3f} |")
    lines += ["", "## Calibration wall time (QuantDiT.py report timings, seconds)", "",
              "| setting | search | pass 1 (TAS [+ statistics]) | prepare candidates (LoRA fits) | "
              "alpha search | total | FP sampling loops |", "|---|---|---|---|---|---|---|"]
    for r in results:
        b = r["bits"]
        for m, label, loops in (("ditas", "exact", 2), ("approx", "approx", 1)):
            t = r["timings"][m]
            lines.append(f"| {r['label']} | {label} | {t['tas_statistics_s']:.1f} | {t['prepare_candidates_s']:.1f} | "
                         f"{t['alpha_search_s']:.1f} | {t.get('total_s', float('nan')):.1f} | {loops} |")
    if retimed:
        lines += ["", "Back to back in one process (--retime; order alternates per bit width to balance drift on a "
                  "shared machine; checkpoints written to a temporary directory):", "",
                  "| setting | search | pass 1 | prepare candidates | alpha search | total | speed-up of total |",
                  "|---|---|---|---|---|---|---|"]
        for b, t in retimed:
            for m in ("exact", "approx"):
                x = t[m]
                lines.append(f"| W{b[0]}A{b[1]} {args.schemes[0]} | {m} | {x['tas_statistics_s']:.1f} | {x['prepare_candidates_s']:.1f} | "
                             f"{x['alpha_search_s']:.1f} | {x['total_s']:.1f} | "
                             f"{t['exact']['total_s'] / x['total_s']:.2f}x |")
    lines += ["", "## Sample quality (mean ± std over seeds; difference = approx − exact, per seed)", "",
              "| setting | search | FID-digits | classified as label | PSNR vs FP (dB) |", "|---|---|---|---|---|"]
    for r in results:
        b, sc = r["bits"], r["scores"]
        for m, label in (("ditas", "exact"), ("approx", "approx")):
            ps = sc[m]
            lines.append(f"| {r['label']} | {label} | {study.fmt([x['fid'] for x in ps])} | "
                         f"{study.fmt([x['label_acc'] for x in ps], 1, 100)} % | "
                         f"{study.fmt([x['psnr'] for x in ps])} |")
        d = {k: [a[k] - e[k] for a, e in zip(sc["approx"], sc["ditas"])] for k in ("fid", "label_acc", "psnr")}
        lines.append(f"| {r['label']} | difference | {study.fmt(d['fid'])} | "
                     f"{study.fmt(d['label_acc'], 1, 100)} pp | {study.fmt(d['psnr'])} |")
        lines.append(f"| {r['label']} | model.safetensors identical? | {'yes' if r['same_weights'] else 'no'} | | |")
    lines += ["", f"Bench wall time {(time.time() - t_start) / 60:.1f} min (cached stages excluded).", ""]
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"command": command, "results": results}, f, indent=1, default=str)
    print(text)
    return results


if __name__ == "__main__":
    main()
