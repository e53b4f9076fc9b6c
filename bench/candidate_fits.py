"""The ditas scheme's defaults (subspace-SVD LoRA fits, shortlist search) vs the exhaustive search.

    python bench/candidate_fits.py                 # ~15-18 min on one thread (a shared 2-core machine)
    python bench/candidate_fits.py --quick         # A: bundled, 2 steps, 2 labels, 11 alphas; B: shapes / 9

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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from ditas import cli  # noqa: E402
from ditas import threads  # noqa: E402  (before torch: OpenMP's wait policy)
import torch  # noqa: E402
from bench.common import cpu_name, write_report  # noqa: E402
from bundled.digits import BUNDLED_CKPT  # noqa: E402
from config import calib_labels  # noqa: E402
from models import DiT_models  # noqa: E402
from ditas.pipeline import make_sampler, sample_inputs  # noqa: E402
from quant.calibration.driver import quantize_dit  # noqa: E402
from quant.quant_config import QuantConfig  # noqa: E402
from quant.search.candidates import Candidates  # noqa: E402
from quant.quant_config import alpha_grid  # noqa: E402

XL_SHAPES = {"qkv": (3456, 1152), "proj": (1152, 1152), "fc1": (4608, 1152), "fc2": (1152, 4608)}
SEED = 1  # the calibration noise (QuantDiT's --seed)


def build_model(kind):
    """(model, setting): the bundled DiT-T/2, or DiT-S/2 with seeded random weights (adaLN not zero)."""
    if kind == "bundled":
        from download import find_model, load_model_state
        model = DiT_models["DiT-T/2"](input_size=16, in_channels=3, num_classes=10)
        path = os.path.join(ROOT, BUNDLED_CKPT)
        load_model_state(model, find_model(path), path)
        return model.eval(), dict(shape=(3, 16, 16), classes=10, clip=True, name="bundled DiT-T/2, 16x16x3, 64 tokens")
    torch.manual_seed(0)
    model = DiT_models["DiT-S/2"](input_size=8, in_channels=4, num_classes=1000)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adaLN-Zero and the final layer start at 0: give them weights
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval(), dict(shape=(4, 8, 8), classes=1000, clip=False, name="DiT-S/2 random, 8x8x4, 16 tokens")


def spread(ratios):
    """{mean, min, max} of ratio - 1 in %."""
    xs = [100 * (x - 1) for x in ratios] or [float("nan")]
    return dict(mean=sum(xs) / len(xs), min=min(xs), max=max(xs))


def pct(d):
    return f"{d['mean']:+.2f}% ({d['min']:+.2f}% / {d['max']:+.2f}%)"


CONFIGS = {  # the defaults; the same candidate fits scored exhaustively; the exhaustive search (full SVD, exact)
    "new": lambda step: QuantConfig(alpha_step=step),
    "exact": lambda step: QuantConfig(alpha_step=step, search="exact"),
    "full": lambda step: QuantConfig(alpha_step=step, svd="full", search="exact")}


def quality(kind, steps, n_labels, alpha_step=0.05):
    """The three configs on fresh copies of one model with the same loop: the table row and per-layer data."""
    model, s = build_model(kind)
    labels = calib_labels(s["classes"])[:n_labels]
    runs = {}
    for key, make in CONFIGS.items():
        cfg = make(alpha_step)
        m = copy.deepcopy(model)
        sampler = make_sampler(m, steps, 1.5, clip_denoised=s["clip"])

        def loop():
            gens, y, z = sample_inputs(SEED, range(len(labels)), s["classes"], s["shape"], labels)
            sampler(z, y, gens)
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


def shapes(div):  # XL_SHAPES, each side divided by div
    return {n: (o // div, i // div) for n, (o, i) in XL_SHAPES.items()}


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


def fmt_quality(rows, n_alphas):
    ok = lambda good: "ok" if good else "MISSED"  # noqa: E731
    c = QuantConfig()
    lines = ["## A. Quality: the ditas defaults vs the exhaustive search", "",
             f"new = QuantDiT.py's defaults (subspace SVD, the {c.search_shortlist} best predicted candidates scored "
             "exactly); exhaustive = full SVD in every fit and every candidate scored exactly (`--svd full --search "
             "exact`).", "",
             "| model | steps x labels | layers | equal alpha (target >= 90 %) | output error new/exhaustive - 1, mean "
             "(min / max) (target: mean <= +1 %) | weight error after LoRA new/exhaustive - 1, mean (min / max) | "
             "prepare s, new / exhaustive | alpha search s, new / exhaustive | SVDs, new / exhaustive |",
             "|---|---|---:|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['steps']} x {r['labels']} | {r['layers']} | {r['same']} ({r['same_pct']:.1f}%) "
              f"{ok(r['same_pct'] >= 90)} | {pct(r['out'])} {ok(r['out']['mean'] <= 1)} | {pct(r['w'])} | "
              f"{r['prep_new']:.1f} / {r['prep_full']:.1f} ({r['prep_full'] / r['prep_new']:.1f}x) | "
              f"{r['search_new']:.1f} / {r['search_full']:.1f} ({r['search_full'] / r['search_new']:.1f}x) | "
              f"{r['svds_new']} / {r['svds_full']} |" for r in rows]
    lines += ["", f"W{c.weight_bit}A{c.act_bit}, group {c.group_size}, LoRA rank {c.lora_rank}, {c.lora_iters} "
              f"iterations, {n_alphas} alphas (QuantConfig's defaults); DDPM, "
              f"cfg 1.5, calibration seed {SEED}, the same noise for every run. Per layer, each run at its own chosen "
              "alpha (output error: the search loss there, mean squared error per step); negative = the default is "
              "better.", "",
              "Each approximation alone:", "",
              "| model | shortlist: equal alpha to scoring every candidate of the same fits (`--search exact`) | "
              "shortlist: output error / every candidate's best - 1, mean (min / max) | subspace fits: alpha within "
              "+-0.05 of the exhaustive | subspace fits: output error / full SVD's - 1 over every (layer, alpha), mean "
              "(min / max) | weight error after LoRA new/exhaustive - 1, layers of equal alpha, mean (min / max) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['short_same']} ({100 * r['short_same'] / r['layers']:.1f}%) | {pct(r['short'])} | "
              f"{r['near']} ({100 * r['near'] / r['layers']:.1f}%) | {pct(r['every'])} | {pct(r['w_same'])} |"
              for r in rows]
    return lines


def fmt_cost(res, div):
    tot = {k: sum(r[k]["s"] for r in res.values()) for k in ("ditas", "reference")}
    measured = [n for n, r in res.items() if "ditas-full" in r]
    ex = [res[n]["ditas-full"]["s"] / res[n]["ditas"]["s"] for n in measured]
    extrap = tot["ditas"] * sum(ex) / len(ex) if ex else None
    lines = ["## B. Cost at DiT-XL/2 shapes: Candidates of one block's four linears (one thread)", "",
             *([f"(--quick: every side divided by {div}, not DiT-XL/2's shapes.)", ""] if div > 1 else []),
             "| layer (out x in) | ditas default (subspace, 21 fits) s | reference (1 full-SVD fit) s | ditas / "
             "reference (target <= 3x) | exhaustive ditas (full SVD, 21 fits) s | SVDs ditas / reference / exhaustive |",
             "|---|---:|---:|---:|---:|---|"]
    for name, r in [*res.items(), ("**block**", {k: dict(s=v, svds="") for k, v in tot.items()})]:
        ratio, full = r["ditas"]["s"] / r["reference"]["s"], r.get("ditas-full")
        shape = f" ({' x '.join(map(str, shapes(div)[name]))})" if name in res else ""
        full = f"{full['s']:.1f}" if full else (f"~{extrap:.0f} (extrapolated)" if ex and not shape else "not run")
        svds = "" if not shape else f"{r['ditas']['svds']} / {r['reference']['svds']} / " + (
            str(r["ditas-full"]["svds"]) if "ditas-full" in r else "-")
        lines.append(f"| {name}{shape} | {r['ditas']['s']:.1f} | {r['reference']['s']:.1f} | {ratio:.2f}x "
                     f"{'ok' if ratio <= 3 else 'MISSED'} | {full} | {svds} |")
    if ex:
        lines += ["", f"The exhaustive ditas fits were run for {', '.join(measured)} only (all four would take about "
                  "15 minutes on one thread); the block's value in that column is an **extrapolation**: the block's "
                  f"ditas-default seconds x {'/'.join(measured)}'s exhaustive/default ratio "
                  f"({', '.join(f'{x:.1f}x' for x in ex)})."]
    return lines, dict(block=tot, block_ratio=tot["ditas"] / tot["reference"], block_exhaustive_extrapolated=extrap)


def fmt_refit(layers, block, ks=(1, 2, 3, 4, 5, 6, 8)):
    """Table C: refit the k best alphas of the default fits (by their exact loss) with the full SVD. block: table
    B's seconds per block {ditas, reference} (fmt_cost's), or None without table B."""
    rank = {kind: [sorted(r["losses_exact"], key=r["losses_exact"].get).index(
        min(r["losses_full"], key=r["losses_full"].get)) for r in pl.values()] for kind, pl in layers.items()}
    lines = ["## C. What equal alphas would cost: refit the k best alphas of the default fits with the full SVD", "",
             "Equal alphas need the chosen alpha's fit to be the full SVD's own: a change of the weights by 1e-5 "
             "already moves the exhaustive search's alpha in most layers (bench/results/search_noise.md). A search "
             "that refits the k best alphas of the default fits with the full SVD, and scores those exactly, holds "
             "the exhaustive alpha when it is among those k. Ranked here by the default fits' exact losses (table "
             "A's `--search exact` run). Cost per block: the default fits (one per alpha) plus k full-SVD fits "
             "of one reference fit's cost each (table B).", "",
             "| k | " + " | ".join(f"{kind}: exhaustive alpha among the k best" for kind in rank) +
             " | candidate cost per block vs reference (target <= 3x) |",
             "|---:|" + "---:|" * len(rank) + "---:|"]
    for k in ks:
        held = [(sum(x < k for x in r), len(r)) for r in rank.values()]
        cells = [f"{n}/{m} ({100 * n / m:.0f}%)" for n, m in held]
        c = f"{(block['ditas'] + k * block['reference']) / block['reference']:.2f}x" if block else "(table B not run)"
        lines.append(f"| {k} | {' | '.join(cells)} | {c} |")
    return lines, rank


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
           f"`python bench/candidate_fits.py {' '.join(sys.argv[1:])}`".replace(" `", "`"), "",
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
