"""Where the W4A8 calibration-seed spread comes from and what removes it (issue 30), on the bundled digits DiT.

    OMP_NUM_THREADS=1 python bench/calib_spread.py --threads 1 --swap 1 2        # the committed table
    OMP_NUM_THREADS=1 python bench/calib_spread.py --settings n16 n64 --calib-seeds 1 2

Every row is one calibration setting (QuantDiT.py flags on top of W4A8 ditas with the paper's search and no bias
correction; select is QuantDiT's default, docs/METHOD.md §16, and fixed-bc was before it, §15), calibrated at
each --calib-seeds (QuantDiT.py --seed: the calibration noise batch) and sampled with ONE sampling seed
(--seed) and --num-samples samples at --steps DDPM steps, so the calibration draw is the only thing that
differs between the columns. Each cell: mean PSNR of every sample against the FP sample from the same
noise (bench/study.py mean_psnr). Spread = max - min over the calibration seeds. Calibration time:
QuantDiT's total_s (report.json) under the run's load. Per-layer alphas come from each checkpoint's
report.json; the alpha table counts the layers whose searched alpha differs between the seeds.

Checkpoints and samples are cached (bench/study.py Bench) in --results-dir, so a rerun only computes what
is missing. Writes --out (markdown) and the same data as json next to it.
"""
import argparse
import json
import os
import sys
import time

from ditas import threads  # before torch: sets OpenMP's wait policy, read when torch loads
import numpy as np
import torch

from bench.common import ROOT
from bench.study import Bench, log, machine, mean_psnr
from bundled.digits import BUNDLED_CKPT, NUM_CLASSES


def cycle_labels(n):
    """n labels cycling over the classes (config.calib_labels' rule, extended past 16)."""
    return [i % NUM_CLASSES for i in range(n)]


def labels_flags(n, chunks):
    return ["--calib-labels", *map(str, cycle_labels(n)), "--calib-chunks", str(chunks)]


# name -> (description, calibration steps, QuantDiT.py flags on top of bench/study.py's "ditas" row: W4A8 ditas with the
# paper's alpha search, no bias correction); the 16-sample rows pin --calib-samples 16 (QuantDiT's default, so that
# they keep their batch if it changes). select is QuantDiT's ditas default (fixed-bc before it).
N16 = ["--calib-samples", "16"]
SETTINGS = {
    "n16": ("16 labels, searched alpha (the paper; QuantDiT's default before bias correction), 10 calib steps", 10,
            N16),
    "n32": ("32 labels (2 chunks), 10 calib steps", 10, labels_flags(32, 2)),
    "n64": ("64 labels (4 chunks), 10 calib steps", 10, labels_flags(64, 4)),
    "n128": ("128 labels (8 chunks), 10 calib steps", 10, labels_flags(128, 8)),
    "n32-approx": ("32 labels (2 chunks), approximate search (one FP loop)", 10,
                   labels_flags(32, 2) + ["--search", "approx"]),
    "n64-approx": ("64 labels (4 chunks), approximate search (one FP loop)", 10,
                   labels_flags(64, 4) + ["--search", "approx"]),
    "s20": ("16 labels, 20 calib steps", 20, N16),
    "s50": ("16 labels, 50 calib steps", 50, N16),
    "fixed": ("16 labels, fixed alpha 0.5 + LoRA r32 (alphas fixed, a_j and LoRA vary)", 10,
              N16 + ["--smoothing", "fixed", "--alpha", "0.5"]),
    "fixed64": ("64 labels (4 chunks), fixed alpha 0.5 + LoRA r32", 10,
                labels_flags(64, 4) + ["--smoothing", "fixed", "--alpha", "0.5"]),
    "search-nolora": ("16 labels, searched alpha, no LoRA", 10, N16 + ["--lora-rank", "0"]),
    "rtn-lora": ("no smoothing + LoRA r32 (nothing depends on the calibration draw)", 10,
                 N16 + ["--smoothing", "none"]),
    "svd": ("16 labels, SVD branch first (--lora-order svd_first, r32)", 10, N16 + ["--lora-order", "svd_first"]),
    "svd-token": ("16 labels, SVD branch first + per-token activations", 10,
                  N16 + ["--lora-order", "svd_first", "--act-granularity", "token"]),
    "token": ("16 labels, per-token activations (residual LoRA r32)", 10, N16 + ["--act-granularity", "token"]),
    "r4": ("16 labels, residual LoRA r4 (DiT-XL/2's r32 share of the width)", 10, N16 + ["--lora-rank", "4"]),
    "svd-r4": ("16 labels, SVD branch first, r4", 10, N16 + ["--lora-order", "svd_first", "--lora-rank", "4"]),
    "rtn-r4": ("no smoothing + LoRA r4 (nothing depends on the calibration draw)", 10,
               N16 + ["--smoothing", "none", "--lora-rank", "4"]),
    "n16-bc": ("16 labels, searched alpha + bias correction (--bias-correction)", 10, N16 + ["--bias-correction"]),
    "fixed-bc": ("16 labels, fixed alpha 0.5 + LoRA r32 + bias correction (QuantDiT's default before smoothing "
                 "select)", 10, N16 + ["--smoothing", "fixed", "--alpha", "0.5", "--bias-correction"]),
    **{f"a{a}-bc": (f"16 labels, fixed alpha {a} + LoRA r32 + bias correction", 10,
                    N16 + ["--smoothing", "fixed", "--alpha", a, "--bias-correction"]) for a in ("0.3", "0.4", "0.6")},
    "select": ("16 labels, smoothing select (QuantDiT's default): no smoothing or alpha 0.5 (LoRA r32 + bias "
               "correction each), the one nearer FP end to end on the calibration batch kept", 10,
               N16 + ["--smoothing", "select", "--select-from", "none", "0.5", "--bias-correction"]),
    "rtn-bc": ("no smoothing + LoRA r32 + bias correction (only the mean error depends on the draw)", 10,
               N16 + ["--smoothing", "none", "--bias-correction"]),
    # W4A4 (--act-bit 4 overrides the base's 8): the measured W4A4 best (bench/results/w4a4.md) against the defaults
    "a4-search": ("W4A4: searched alpha + LoRA r32 (the paper)", 10, N16 + ["--act-bit", "4"]),
    "a4-default": ("W4A4: alpha 0.5 + LoRA r32 + bias correction (QuantDiT's default before smoothing select)", 10,
                   N16 + ["--act-bit", "4", "--smoothing", "fixed", "--alpha", "0.5", "--bias-correction"]),
    "a4-svd-token": ("W4A4: searched alpha + SVD-first r32 + per-token (the best of bench/results/w4a4.md)", 10,
                     N16 + ["--act-bit", "4", "--lora-order", "svd_first", "--act-granularity", "token"]),
    "a4-default-svd-token": ("W4A4: alpha 0.5 + bias correction + SVD-first r32 + per-token", 10,
                             N16 + ["--act-bit", "4", "--smoothing", "fixed", "--alpha", "0.5", "--bias-correction",
                                    "--lora-order", "svd_first", "--act-granularity", "token"]),
    "a4-svd-token-bc": ("W4A4: searched alpha + SVD-first r32 + per-token + bias correction", 10,
                        N16 + ["--act-bit", "4", "--lora-order", "svd_first", "--act-granularity", "token",
                               "--bias-correction"]),
    **{f"rtn-it{n}": (f"no smoothing + LoRA r32, {n} LoRA iterations (a draw-free realization)", 10,
                      N16 + ["--smoothing", "none", "--lora-iters", str(n)]) for n in (6, 7, 8, 9, 11, 12)},
}
DEFAULT_SETTINGS = ["n16", "n32", "n64", "n128", "s20", "fixed", "fixed64", "n32-approx", "svd", "svd-token", "token",
                    "rtn-lora", "r4", "svd-r4", "rtn-r4", "n16-bc", "fixed-bc", "rtn-bc"]


class SpreadBench(Bench):
    """Bench whose checkpoints take a setting's extra flags (part of the cache key through the argv)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.extra = []

    def quant_argv(self, bits, scheme, method, steps, calib_seed=None):
        return super().quant_argv(bits, scheme, method, steps, calib_seed) + self.extra


def run_setting(bench, name, seeds, args, fp):
    """{seed: {psnr, calib_s, alphas}} of one setting."""
    _, calib_steps, extra = SETTINGS[name]
    bench.extra, bench.calib_steps = list(extra), calib_steps
    out = {}
    for cs in seeds:
        qdir = bench.checkpoint((4, 8), "ditas", "ditas", args.steps, calib_seed=cs)
        with open(os.path.join(qdir, "report.json")) as f:
            report = json.load(f)
        images = bench.samples(qdir, args.seed, args.num_samples, args.steps)
        per_sample = [mean_psnr(images[i:i + 1], fp[i:i + 1]) for i in range(len(images))]
        out[cs] = {"psnr": mean_psnr(images, fp), "sem": float(np.std(per_sample, ddof=1) / np.sqrt(len(images))),
                   "calib_s": report["timings"]["total_s"],
                   "alphas": {k: v["alpha"] for k, v in report["layers"].items()}, "dir": qdir}
        log(f"{name} calib seed {cs}: {out[cs]['psnr']:.2f} dB, calibration {out[cs]['calib_s']:.0f} s")
    return out


SWAPS = {"attn.qkv": ("attn.qkv",), "attn.proj": ("attn.proj",), "mlp.fc1": ("mlp.fc1",), "mlp.fc2": ("mlp.fc2",),
         "blocks 0-3": ("blocks.0.", "blocks.1.", "blocks.2.", "blocks.3."),
         "blocks 4-7": ("blocks.4.", "blocks.5.", "blocks.6.", "blocks.7.")}


def swapped_checkpoint(dir_a, dir_b, part, results_dir):
    """A checkpoint: dir_a's with the quantized layers that SWAPS[part] names (alpha, smoothing, codes, LoRA)
    taken from dir_b (both calibrated with the same flags but another seed); cached by name."""
    from quant.io.checkpoint import is_quantized_checkpoint, load_quantized, save_quantized
    from quant.method.layers import quantizable_layers
    out = os.path.join(results_dir, "ckpt", f"swap-{os.path.basename(dir_a)}-{os.path.basename(dir_b)}-"
                       + part.replace(" ", "").replace(".", ""))
    if is_quantized_checkpoint(out):
        return out
    (a, meta), (b, meta_b) = load_quantized(dir_a), load_quantized(dir_b)
    names = [n for n in quantizable_layers(a) if any(k in n for k in SWAPS[part])]
    for n in names:
        a.set_submodule(n, b.get_submodule(n))
        meta["alphas"][n] = meta_b["alphas"][n]
    with open(os.path.join(dir_a, "report.json")) as f:
        report = json.load(f)
    save_quantized(a, {k: v for k, v in meta.items() if k != "layers"}, report, out,
                   storage_dtype=meta["storage_dtype"])
    return out


def run_swaps(bench, per, a, b, args, fp):
    """{part: PSNR} of seed a's checkpoint with `part` taken from seed b's."""
    out = {}
    for part in SWAPS:
        qdir = swapped_checkpoint(per[a]["dir"], per[b]["dir"], part, args.results_dir)
        out[part] = mean_psnr(bench.samples(qdir, args.seed, args.num_samples, args.steps), fp)
        log(f"seed {a} with {part} of seed {b}: {out[part]:.2f} dB")
    return out


def alpha_changes(per_seed):
    """Layers whose alpha is not the same at every seed: {layer: [alpha per seed]}."""
    seeds = list(per_seed)
    layers = per_seed[seeds[0]]["alphas"]
    return {k: [per_seed[s]["alphas"][k] for s in seeds] for k in layers
            if len({per_seed[s]["alphas"][k] for s in seeds}) > 1}


def table(results, seeds):
    head = ("| setting | " + " | ".join(f"seed {s} (dB)" for s in seeds)
            + " | mean (dB) | spread max-min (dB) | calibration (s), mean | layers whose alpha changes |")
    lines = [head, "|" + "---|" * (len(seeds) + 5)]
    for name, per in results.items():
        p = [per[s]["psnr"] for s in seeds]
        t = [per[s]["calib_s"] for s in seeds]
        changed = len(alpha_changes(per))
        lines.append(f"| {name}: {SETTINGS[name][0]} | " + " | ".join(f"{x:.2f}" for x in p)
                     + f" | {np.mean(p):.2f} | {max(p) - min(p):.2f} | {np.mean(t):.0f} | "
                     + f"{changed}/{len(per[seeds[0]]['alphas'])} |")
    return lines


def alpha_lines(per, seeds):
    ch = alpha_changes(per)
    lines = ["| layer | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|" + "---|" * (len(seeds) + 1)]
    lines += [f"| {k} | " + " | ".join(f"{a:g}" if a is not None else "-" for a in v) + " |" for k, v in ch.items()]
    return lines


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=DEFAULT_SETTINGS)
    p.add_argument("--calib-seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--seed", type=int, default=0, help="the one sampling seed")
    p.add_argument("--num-samples", type=int, default=200)
    p.add_argument("--steps", type=int, default=10, help="sampling steps")
    p.add_argument("--swap", type=int, nargs=2, metavar=("A", "B"),
                   help="also sample seed A's checkpoint of the first --settings with each SWAPS part of seed B's")
    p.add_argument("--ckpt", default=BUNDLED_CKPT)
    p.add_argument("--results-dir", default=os.path.join("results", "bench"))
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "calib_spread.md"))
    threads.add_threads_arg(p)
    return p


def main(args):
    threads.set_threads(args.threads)
    torch.set_grad_enabled(False)
    t0 = time.time()
    bench = SpreadBench(args.ckpt, args.results_dir)
    fp = bench.samples(None, args.seed, args.num_samples, args.steps)
    results = {name: run_setting(bench, name, args.calib_seeds, args, fp) for name in args.settings}
    seeds = args.calib_seeds
    swaps = {}
    if args.swap:
        a, b = args.swap
        name = args.settings[0]
        swaps = {f"{a}<-{b}": run_swaps(bench, results[name], a, b, args, fp)}
    cmd = "python bench/calib_spread.py " + " ".join(sys.argv[1:])
    md = ["# Calibration-seed spread of W4A8 DiTAS (bundled digits DiT-T/2)", "",
          f"Command: `OMP_NUM_THREADS=1 {cmd.strip()}`", "",
          f"W4A8 ditas with the paper's alpha search and no bias correction (bench/study.py's \"ditas\" row), plus "
          f"each setting's flags; calibration seeds {seeds}; one sampling "
          f"seed ({args.seed}), {args.num_samples} samples, {args.steps} DDPM steps, cfg 1.5. PSNR: mean over "
          f"samples vs the FP sample from the same noise. Machine: {machine()}. Wall time "
          f"{(time.time() - t0) / 60:.1f} min (cached cells excluded).", ""]
    sems = [c["sem"] for per in results.values() for c in per.values()]
    md += [f"Sampling part of the noise: the standard error of a cell's mean over its {args.num_samples} samples "
           f"(per-sample PSNR standard deviation / sqrt(n)) is {min(sems):.2f}-{max(sems):.2f} dB, and every cell "
           f"shares the same samples' noise, so differences between cells are mostly calibration.", ""]
    md += table(results, seeds)
    name, per = next(iter(results.items()))  # the first setting's alphas per layer and seed
    if alpha_changes(per):
        md += ["", f"### Alphas that change between seeds: {name}", ""] + alpha_lines(per, seeds)
    if swaps:
        a, b = args.swap
        per = results[args.settings[0]]
        md += ["", f"### Layers swapped between the checkpoints of calibration seeds {a} and {b} "
               f"({args.settings[0]}; PSNR in dB)", "",
               f"Each quantized layer moves whole (alpha, smoothing factors, codes, LoRA). Unswapped: seed {a} "
               f"{per[a]['psnr']:.2f}, seed {b} {per[b]['psnr']:.2f}.", "",
               f"| seed {a}'s checkpoint with these layers from seed {b} | PSNR (dB) | change (dB) |", "|---|---|---|"]
        md += [f"| {part} | {swaps[f'{a}<-{b}'][part]:.2f} | {swaps[f'{a}<-{b}'][part] - per[a]['psnr']:+.2f} |"
               for part in SWAPS]
    with open(args.out, "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"args": vars(args), "swaps": swaps, "results": {n: {str(s): v for s, v in per.items()}
                                                     for n, per in results.items()}}, f, indent=1)
    print("\n".join(md))
    return results


if __name__ == "__main__":
    main(build_parser().parse_args())
