"""Quality study on the bundled digits DiT: what each part of DiTAS buys, per bit width and scheme.

    python bench/quality.py --jobs 2 --threads 1                     # the committed table, ~96 min on 2 cores
    python bench/quality.py --quick                                  # 100 samples, 1 draw: minutes

Rows, for every bit width of the ditas scheme (the quantized rows all from QuantDiT.py's flags):

    RTN                     --smoothing none --lora-rank 0      (round-to-nearest, no smoothing)
    SmoothQuant alpha 0.5   --smoothing fixed --alpha 0.5 --lora-rank 0
    TAS searched, no LoRA   --smoothing search --lora-rank 0
    DiTAS                   --smoothing search (LoRA rank 32: the full method)
    extra rows (--extra):   the approximate search (--search approx), per-token activations, and by
                            default the released numerics' four rows at W4A8 (--schemes ditas reference
                            gives them at every bit width, ~30 min more)

plus FP and real digits as floors. The W4A4 options beyond the paper (--lora-order svd_first, --hadamard: rows
svd*, had*, r4) are extra rows; bench/results/w4a4.md has their table and its command. A *draw* is one
(calibration seed, sampling seed) pair: every
quantized row is calibrated with QuantDiT.py --seed c and sampled with global seed s, for each pair
of --calib-seeds and --seeds (zipped), so each cell's mean +- standard deviation covers both noise
sources; FP rows have only the sampling seed. Since all rows of one draw share its seeds, the
"FID - RTN" column also gives each row's difference to RTN paired within the draw (the
comparison the seeds disturb least). Columns: FID-digits and IS-digits (evaluator.evaluate,
digits features, against assets/digits_ref.npz), the fraction the bundled classifier assigns to the
conditioning label, and the mean PSNR of each sample against the FP sample from the same noise.

--backend-check W8A8:ditas adds a second table: that row sampled with the fake and the int
backend from the same checkpoint (calibration seed = the first --calib-seeds) for every
--backend-seeds, FID of both, and the PSNR between the two backends' images.

Work is divided over --jobs processes (one cell = calibrate if not cached, sample, score);
quantized checkpoints are cached in results/bench/ckpt/ (keyed by the FP checkpoint's content and
the flags) and sample batches in results/bench/samples/ (the sampler's own resumable shards), so
an interrupted run resumes and a rerun only computes what is missing. Writes bench/results/
quality.md, quality.json and (with matplotlib) quality.png: FID-digits and PSNR vs bit width.
"""
import argparse
import concurrent.futures
import json
import multiprocessing
import os
import shlex
import sys
import threading
import time

from ditas import threads  # first: sets OpenMP's wait policy, read when torch loads
import torch

from bench.common import ROOT
from bench.quality_rows import (backend_table, bits_name, components_table, figure, main_table, parse_check,
                                parse_extra, study_rows)
from bench.study import METHODS, PSNR_CAP_DB, QUICK, Bench, log, machine, mean_psnr, parse_bits
from bundled.digits import BUNDLED_CKPT
from config import CALIB_SAMPLES

FULL = dict(num_samples=1000, steps=10)
DEFAULT_BITS = ["W4A8", "W4A6", "W4A4", "W3A8"]
DEFAULT_METHODS = ["rtn", "fixed", "search", "ditas"]
DEFAULT_SCHEMES = ["ditas"]
# The released numerics (reference) at W4A8 only: its four rows at every bit width would add ~30 min to the
# default run's ~96 min; --schemes ditas reference gives them all.
DEFAULT_EXTRA = ["W4A8:ditas:approx", "W4A4:ditas:token"] + [f"W4A8:reference:{m}" for m in DEFAULT_METHODS]
# calibration cost order (the dearest cells start first)
COST = {"ditas": 4, "token": 4, "adaln": 4, "approx": 3, "approx-token": 3, "search": 3, "fixed": 1, "rtn": 1,
        "svd": 3, "svd-token": 3, "had": 4, "had-token": 4, "had-svd": 3, "had-svd-token": 3, "r4": 4, "svd-r4": 3,
        "had-svd-token-r4": 3, "default": 2, "ditas-bc": 4, "select": 4}


# ---------------------------------------------------------------------------------------------- cells
# A cell is one unit of work, a plain tuple (so it crosses to a worker process):
#   ("real", seed) | ("fp", seed) | ("q", bits, scheme, method, calib_seed, seed, backend)

def run_cell(spec, cell):
    """Compute one cell (calibrate / sample unless cached) and return (cell, metrics, timings)."""
    bench = Bench(spec["ckpt"], spec["results_dir"], spec["cfg_scale"], spec["batch_size"], spec["calib_steps"])
    n, steps = spec["n"], spec["steps"]
    kind, seed = cell[0], cell[-2] if cell[0] == "q" else cell[1]
    if kind == "real":
        return cell, bench.score_real(n, seed), bench.timings
    fp = bench.samples(None, seed, n, steps)
    if kind == "fp":
        return cell, bench.score(fp, seed), bench.timings
    _, bits, scheme, method, calib_seed, seed, backend = cell
    qdir = bench.checkpoint(tuple(bits), scheme, method, steps, calib_seed)
    images = bench.samples(qdir, seed, n, steps, backend)
    metrics = bench.score(images, seed, fp)
    metrics["calibration_s"] = calib_time(qdir)
    if backend != "fake":  # the same checkpoint's fake-backend images: how far the backends' images differ
        metrics["psnr_vs_fake"] = mean_psnr(images, bench.samples(qdir, seed, n, steps, "fake"))
    return cell, metrics, bench.timings


def _init_worker(n_threads, parent):
    threads.set_threads(n_threads)
    torch.set_grad_enabled(False)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent, poll_s=2.0):
    """Exit once the parent is gone: a killed parent's worker would otherwise go on with the cells queued
    to it, calibrating and sampling beside the rerun's workers."""
    while os.getppid() == parent:
        time.sleep(poll_s)
    os._exit(1)


def run_cells(spec, cells, jobs, n_threads):
    """{cell: metrics} for all cells, over `jobs` spawned processes (inline for jobs 1)."""
    results, timings = {}, {}

    def take(out):
        cell, metrics, t = out
        results[cell] = metrics
        timings.update(t)
        log(f"done {describe(cell)}: FID {metrics['fid']:.2f}" + (f", PSNR {metrics['psnr']:.2f} dB"
                                                                    if "psnr" in metrics else ""))

    # FP samples first: every quantized cell of a sampling seed scores its PSNR against them
    first = [c for c in cells if c[0] != "q"]
    rest = sorted((c for c in cells if c[0] == "q"), key=lambda c: (c[6] != "fake", -COST[c[3]], c[1][1], c))
    if jobs <= 1:
        for c in first + rest:
            take(run_cell(spec, c))
        return results, timings
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                                initargs=(n_threads, os.getpid())) as pool:
        for group in (first, rest):
            for fut in concurrent.futures.as_completed([pool.submit(run_cell, spec, c) for c in group]):
                take(fut.result())
    return results, timings


def describe(cell):
    if cell[0] != "q":
        return f"{cell[0]} seed {cell[1]}"
    _, bits, scheme, method, cs, s, backend = cell
    return f"{bits_name(bits)} {scheme} {method} calib seed {cs} sampling seed {s}" + (
        f" ({backend})" if backend != "fake" else "")


def calib_time(qdir):
    try:
        with open(os.path.join(qdir, "report.json")) as f:
            return json.load(f)["timings"].get("total_s")
    except (OSError, ValueError, KeyError):
        return None


# ---------------------------------------------------------------------------------------------- main
def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=None, help=f"samples per row and draw "
                   f"(default {FULL['num_samples']}; --quick {QUICK['num_samples']})")
    p.add_argument("--steps", type=int, default=None, help=f"DDPM steps for sampling and calibration "
                   f"(default {FULL['steps']}; --quick {QUICK['steps']})")
    p.add_argument("--calib-steps", type=int, default=None,
                   help="calibration steps if different from --steps (the paper calibrates at the sampling steps)")
    p.add_argument("--calib-seeds", type=int, nargs="+", default=None,
                   help="QuantDiT.py --seed of each draw (default 1 2; --quick 1)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="sampling (global) seed of each draw, zipped with --calib-seeds (default 0 1; --quick 0)")
    p.add_argument("--bits", type=parse_bits, nargs="+", default=[parse_bits(b) for b in DEFAULT_BITS],
                   help=f"bit widths (default {' '.join(DEFAULT_BITS)})")
    p.add_argument("--schemes", nargs="+", choices=("ditas", "reference"), default=DEFAULT_SCHEMES)
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    p.add_argument("--extra", type=parse_extra, nargs="*", default=[parse_extra(e) for e in DEFAULT_EXTRA],
                   help=f"extra rows BITS:SCHEME:METHOD (default {' '.join(DEFAULT_EXTRA)})")
    p.add_argument("--backend-check", type=parse_check, nargs="*", default=[parse_check("W8A8:ditas")],
                   help="settings whose DiTAS row is also sampled with --backend int (default W8A8:ditas)")
    p.add_argument("--backend-seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="sampling seeds of the backend check (default 0 1 2)")
    p.add_argument("--quick", action="store_true", help="the reduced setting: "
                   f"{QUICK['num_samples']} samples, {QUICK['steps']} steps, one draw (explicit flags win)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="sampling guidance (the paper's 1.5)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--jobs", type=int, default=1, help="worker processes (each with --threads threads)")
    threads.add_threads_arg(p)
    p.add_argument("--ckpt", default=BUNDLED_CKPT, help="the FP digits DiT (default: the bundled asset)")
    p.add_argument("--results-dir", default=os.path.join("results", "bench"))
    p.add_argument("--out", default=os.path.join("bench", "results", "quality.md"))
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    n = args.num_samples or base["num_samples"]
    steps = args.steps or base["steps"]
    calib_seeds = args.calib_seeds or ([1] if args.quick else [1, 2])
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    if len(calib_seeds) != len(seeds):
        parser.error(f"--calib-seeds ({len(calib_seeds)}) and --seeds ({len(seeds)}) pair up into draws: "
                     f"give them the same length")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    os.chdir(ROOT)
    threads.set_threads(args.threads)
    torch.set_grad_enabled(False)
    if not os.path.isfile(args.ckpt):
        sys.exit(f"error: {args.ckpt} not found (the bundled model; pass --ckpt results/train/last.pt while it "
                 f"trains)")
    draws = list(zip(calib_seeds, seeds))
    by_setting = {(tuple(b), s): list(args.methods) for b in args.bits for s in args.schemes}
    for eb, es, m in args.extra:  # an extra row joins its setting, one outside --bits / --schemes starts one
        methods = by_setting.setdefault((eb, es), [])
        if m not in methods:
            methods.append(m)
    settings = [(b, s, ms) for (b, s), ms in by_setting.items()]
    extra = set(args.extra)
    all_seeds = sorted(set(seeds) | (set(args.backend_seeds) if args.backend_check else set()))
    cells = [("real", s) for s in seeds] + [("fp", s) for s in all_seeds]
    cells += [("q", b, sch, m, cs, s, "fake") for b, sch, ms in settings for m in ms for cs, s in draws]
    for b, sch in args.backend_check:
        cells += [("q", b, sch, "ditas", calib_seeds[0], s, be) for s in args.backend_seeds for be in ("fake", "int")]
    cells = list(dict.fromkeys(cells))
    spec = dict(ckpt=args.ckpt, results_dir=args.results_dir, cfg_scale=args.cfg_scale, batch_size=args.batch_size,
                calib_steps=args.calib_steps, n=n, steps=steps)
    log(f"{len(cells)} cells ({len(draws)} draws x {sum(len(ms) for _, _, ms in settings)} quantized rows, FP, real,"
        f" backend check) on {args.jobs} process(es) x {torch.get_num_threads()} thread(s)")
    t_start = time.time()
    results, timings = run_cells(spec, cells, args.jobs, torch.get_num_threads())
    wall = time.time() - t_start

    # Tables, figure, JSON
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)  # the figure is written first
    rows = study_rows(results, settings, extra, draws)
    ctable, csummary = components_table(rows)
    btable, bsummary = backend_table(results, args.backend_check, calib_seeds[0], args.backend_seeds)
    png = figure(rows, os.path.splitext(args.out)[0] + ".png")
    command = "python bench/quality.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    calib = args.calib_steps or steps
    text = "\n".join([
        "# Quality study: what each part of DiTAS buys (bundled digits DiT-T/2)", "",
        f"Command: `{command}`", "",
        f"Model: `{args.ckpt}` (sha256 {Bench(args.ckpt).digest}…), {n} samples per row and draw, {steps} DDPM "
        f"steps, cfg {args.cfg_scale}; draws (calibration seed, sampling seed): "
        f"{', '.join(f'({c}, {s})' for c, s in draws)}; calibration: QuantDiT.py defaults ("
        f"{CALIB_SAMPLES} samples, cfg 1.5) "
        f"at {calib} steps. Machine: {machine()}, {args.jobs} process(es). Wall time {wall / 60:.1f} min "
        f"(cached cells excluded).", "",
        "Each cell: mean ± standard deviation over the draws (each draw its own calibration noise and "
        "sampling noise). FID − RTN: the row's FID minus the same setting's RTN FID within each draw. "
        "FID-digits / IS-digits: evaluator.evaluate with the bundled digit classifier's features against "
        f"the 1797 real digits (assets/digits_ref.npz); the `data` row, {n} real digits drawn from that batch, "
        "is the floor at this N. PSNR: per sample against the FP sample from the same noise and label, "
        f"averaged (identical images count as {PSNR_CAP_DB:g} dB). The no-LoRA rows use --lora-rank 0; ditas "
        "quantizes activations per batch row and reference per tensor unless the row says per-token. "
        "Calibration (s): QuantDiT's total time for that checkpoint (under the run's load).", "",
        main_table(rows), "",
        "## What each component buys", "",
        "Row minus row of the same setting, paired within each draw (mean ± standard deviation over the draws); "
        "'better in' counts the draws where the component lowered FID-digits or raised PSNR.", "",
        ctable, "",
        *([f"![FID-digits and PSNR vs bit width]({os.path.basename(png)})", ""] if png else []),
        *(["## Integer vs fake backend", "",
           f"The DiTAS checkpoint of calibration seed {calib_seeds[0]} sampled with `--backend fake` and "
           "`--backend int` (same noise per sampling seed).", "", btable, "",
           *[f"- {b['setting']}: int − fake FID {b['int_minus_fake'][0]:+.2f} ± {b['int_minus_fake'][1]:.2f} "
             f"over the sampling seeds; the fake backend's FID spread over the same seeds ± "
             f"{b['fake_seed_spread'][1]:.2f}." for b in bsummary], ""] if args.backend_check else []),
    ])
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"command": command, "num_samples": n, "steps": steps, "calib_steps": calib,
                   "cfg_scale": args.cfg_scale, "draws": draws, "ckpt": args.ckpt, "machine": machine(),
                   "jobs": args.jobs, "wall_s": wall, "timings": timings, "rows": rows, "components": csummary,
                   "backend_check": bsummary,
                   "backend_cells": [{"cell": list(map(str, c)), **results[c]} for c in cells if c[0] == "q"
                                     and c[6] != "fake"]}, f, indent=1, default=str)
    print(text)
    return rows


if __name__ == "__main__":
    main()
