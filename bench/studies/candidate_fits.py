"""Question: what do the ditas scheme's defaults (subspace-SVD LoRA fits, shortlist search) lose against the
exhaustive search (a full SVD in every fit, every candidate scored), and what do they save?

Answer (bench/results/candidate_fits.md): no output error: at the chosen alpha it is below the exhaustive
search's on average (-0.78 % bundled DiT-T/2, -0.14 % DiT-S/2), though only 31 % / 17 % of the layers pick the same
alpha (the loss over alpha is flat, search_noise.py); the shortlist alone changes no alpha. Per DiT-XL/2 block the
candidates cost 0.39x the reference scheme's one full-SVD fit (the exhaustive fits ~47x the defaults'); holding the
exhaustive alpha in 90 % of layers would take 8 full-SVD refits per layer (8.4x the reference, table C).

    python bench/studies/candidate_fits.py                 # ~15-18 min on one thread (a shared 2-core machine)
    python bench/studies/candidate_fits.py --quick         # A: bundled, 2 steps, 2 labels, 11 alphas; B: shapes / 9

A. Quality. quantize_dit(model, QuantConfig(), loop) (ditas defaults: 21 alphas, one LoRA fit each,
   svd="subspace", the 2 best predicted scored exactly) against QuantConfig(svd="full", search="exact") (a
   LAPACK full SVD in every iteration of every fit, every candidate scored: the exhaustive search), and
   QuantConfig(search="exact") (the default fits, every candidate scored: the shortlist's effect alone),
   each on a fresh copy of the model and the same calibration loop
   (same noise, labels, steps, cfg 1.5), for the bundled DiT-T/2 (16x16x3, 10 classes, pixel space)
   and DiT-S/2 shapes with random weights (8x8x4 latent, 16 tokens, 1000 classes, the released 16
   labels). Per layer: the chosen alpha, the output error and the weight error after LoRA.
B. Cost at DiT-XL/2 shapes: quant.search.candidates.Candidates for the four linears of one block (random
   weights with outlier input columns, a random TAS statistic with outlier channels) for the
   ditas defaults, the reference scheme (one full-SVD fit) and the exhaustive ditas fits (proj only).
C. From A and B: how many of the default fits' best alphas a full-SVD refit would need to hold the
   exhaustive search's alpha in 90 % of layers, and what those refits cost against B's reference fit.

Everything runs single-threaded (--threads 1). Writes bench/results/candidate_fits.md and .json.
"""
import copy
import json
import os
import platform
import sys
import time

from ditas import threads  # first: sets OpenMP's wait policy, read when torch loads
from ditas import cli
import torch
from bench.common import ROOT, cpu_name, write_report
from config import calib_labels
from quant import fp_calibration_loop
from quant.calibration.driver import quantize_dit
from quant.quant_config import QuantConfig
from quant.search.candidates import Candidates
from bench.studies.fits import SEED, build_model, fmt_cost, fmt_quality, fmt_refit, shapes, spread
from quant.quant_config import alpha_grid

CONFIGS = {  # the defaults; the same candidate fits scored exhaustively; the exhaustive search (full SVD, exact)
    "new": lambda step: QuantConfig(smoothing="search", alpha_step=step),
    "exact": lambda step: QuantConfig(smoothing="search", alpha_step=step, search="exact"),
    "full": lambda step: QuantConfig(smoothing="search", alpha_step=step, svd="full", search="exact")}


def quality(kind, steps, n_labels, alpha_step=0.05):
    """The three configs on fresh copies of one model with the same loop: the table row and per-layer data."""
    model, s = build_model(kind)
    labels = calib_labels(s["classes"])[:n_labels]
    runs = {}
    for key, make in CONFIGS.items():
        cfg = make(alpha_step)
        m = copy.deepcopy(model)
        loop = fp_calibration_loop(m, labels, seed=SEED, steps=steps, clip_denoised=s["clip"])
        print(f"{kind}: quantize_dit, svd={cfg.svd}, search={cfg.search} ...", flush=True)
        t0 = time.perf_counter()
        report = quantize_dit(m, cfg, loop, progress=False)
        runs[key] = dict(report=report, wall_s=time.perf_counter() - t0)
        del m
    new, exact, full = (runs[k]["report"]["layers"] for k in CONFIGS)
    per_layer = {n: dict(alpha_new=new[n]["alpha"], alpha_exact=exact[n]["alpha"], alpha_full=full[n]["alpha"],
                         out_ratio=new[n]["output_error"] / full[n]["output_error"],
                         # the shortlist alone: the same fits, its pick against every candidate's exact score
                         short_ratio=new[n]["output_error"] / exact[n]["output_error"],
                         w_ratio=new[n]["weight_error_after_lora"] / full[n]["weight_error_after_lora"],
                         # the fits alone: every alpha's exact loss, subspace vs full SVD
                         all_ratios=[exact[n]["search_losses"][a] / full[n]["search_losses"][a]
                                     for a in full[n]["search_losses"]],
                         shortlist=sorted(new[n]["search_losses"], key=float),
                         losses_exact=exact[n]["search_losses"], losses_full=full[n]["search_losses"])
                 for n in new}
    rs = per_layer.values()
    same = sum(r["alpha_new"] == r["alpha_full"] for r in rs)
    short_same = sum(r["alpha_new"] == r["alpha_exact"] for r in rs)
    row = dict(model=s["name"], steps=steps, labels=n_labels, layers=len(rs), same=same, same_pct=100 * same / len(rs),
               near=sum(abs(r["alpha_exact"] - r["alpha_full"]) <= 0.05 + 1e-9 for r in rs),
               short_same=short_same, short=spread([r["short_ratio"] for r in rs]),
               out=spread([r["out_ratio"] for r in rs]), w=spread([r["w_ratio"] for r in rs]),
               w_same=spread([r["w_ratio"] for r in rs if r["alpha_new"] == r["alpha_full"]]),
               every=spread([x for r in rs for x in r["all_ratios"]]),
               **{f"prep_{k}": runs[k]["report"]["timings"]["prepare_candidates_s"] for k in runs},
               **{f"search_{k}": runs[k]["report"]["timings"]["alpha_search_s"] for k in runs},
               **{f"svds_{k}": runs[k]["report"]["calibration"]["svds"] for k in runs},
               **{f"wall_{k}": runs[k]["wall_s"] for k in runs})
    return row, per_layer


def xl_layer(shape, seed=0):
    """(weight, bias, act_absmax) of a block linear (out, in): std 0.02, 8 outlier input columns x10,
    a positive TAS statistic with 8 outlier channels x30."""
    out, inp = shape
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    w[:, torch.randperm(inp, generator=g)[:8]] *= 10
    b = torch.randn(out, generator=g) * 0.02
    a = torch.rand(inp, generator=g) * 2 + 0.1
    a[torch.randperm(inp, generator=g)[:8]] *= 30
    return w, b, a


def time_candidates(shape, cfg):
    w, b, a = xl_layer(shape)
    t0 = time.perf_counter()
    c = Candidates(w, b, a, cfg.alphas(), cfg.weight_cfg(), cfg.lora_rank, cfg.lora_iters, svd=cfg.svd)
    return dict(s=time.perf_counter() - t0, svds=c.svds)


def cost(div=1, exhaustive=("proj",)):
    configs = {"ditas": QuantConfig(), "reference": QuantConfig(scheme="reference"),
               "ditas-full": QuantConfig(svd="full")}
    res = {}
    for name, shape in shapes(div).items():
        for key, cfg in configs.items():
            if key == "ditas-full" and name not in exhaustive:
                continue
            print(f"XL {name} {shape}: {key} ...", flush=True)
            res.setdefault(name, {})[key] = time_candidates(shape, cfg)
    return res


def main(args):
    threads.set_threads(args.threads)
    torch.set_grad_enabled(False)
    load0, t_start = os.getloadavg(), time.perf_counter()
    settings = [("bundled", 2, 2)] if args.quick else [("bundled", args.steps_bundled, 16), ("s2", args.steps_s2, 16)]
    alpha_step = 0.1 if args.quick else 0.05
    rows, layers = [], {}
    for kind, steps, n in settings:  # A. quality, both configs per model
        row, layers[kind] = quality(kind, steps, n, alpha_step)
        rows.append(row)
    div = 9 if args.quick else 1  # B. cost at DiT-XL/2 shapes (--quick: a ninth of each side)
    res = cost(div, () if args.quick else ("proj",)) if args.cost else {}
    load1 = os.getloadavg()
    doc = ["# The ditas defaults (subspace SVD fits, shortlist search) vs the exhaustive search", "",
           f"`python bench/studies/candidate_fits.py {' '.join(sys.argv[1:])}`".replace(" `", "`"), "",
           f"Machine: {cpu_name()}, {os.cpu_count()} cores, **one thread** (torch.set_num_threads({args.threads})); "
           f"torch {torch.__version__}, Python {platform.python_version()}. Load average (1/5/15 min) before: "
           f"{' / '.join(f'{x:.2f}' for x in load0)}, after: {' / '.join(f'{x:.2f}' for x in load1)}; "
           f"total {time.perf_counter() - t_start:.0f} s.", "", *fmt_quality(rows, len(alpha_grid(alpha_step)))]
    worse = sorted(((k, n, r) for k, pl in layers.items() for n, r in pl.items() if r["out_ratio"] > 1.01),
                   key=lambda t: -t[2]["out_ratio"])
    w_worse = sum(r["w_ratio"] > 1.01 for pl in layers.values() for r in pl.values()
                  if r["alpha_new"] == r["alpha_full"])
    doc += ["", f"Layers whose output error (at the chosen alpha) is more than 1 % above the exhaustive search's: "
            f"{len(worse)}{'; the worst:' if worse else '.'}"]
    doc += [f"- {k} {n}: alpha {r['alpha_new']} (exhaustive {r['alpha_full']}), output error "
            f"{100 * (r['out_ratio'] - 1):+.2f}%, weight error after LoRA {100 * (r['w_ratio'] - 1):+.2f}%"
            for k, n, r in worse[:8]]
    doc += ["", f"Layers of equal alpha whose weight error after LoRA is more than 1 % above full's: {w_worse}."]
    extra = {}
    if res:
        lines, extra = fmt_cost(res, div)
        doc += ["", *lines]
    lines, refit_rank = fmt_refit(layers, extra.get("block"))
    doc += ["", *lines]
    write_report(args.out, doc)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"quality": rows, "layers": layers, "cost": res, "cost_summary": extra,
                   "exhaustive_alpha_rank": refit_rank,
                   "loadavg_before": load0, "loadavg_after": load1, "threads": args.threads}, f, indent=1)


def build_parser():
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--steps-bundled", type=int, default=10, help="calibration DDPM steps, bundled model")
    p.add_argument("--steps-s2", type=int, default=5, help="calibration DDPM steps, DiT-S/2")
    p.add_argument("--quick", action="store_true",
                   help="A: the bundled model only, 2 steps, 2 labels, 11 alphas; B: shapes / 9, no exhaustive fits")
    p.add_argument("--cost", action=cli.argparse.BooleanOptionalAction, default=True, help="table B")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the measurements are single-threaded)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "candidate_fits.md"))
    return p


if __name__ == "__main__":
    cli.run(main, build_parser().parse_args())
