"""bench/studies/candidate_fits.py's and search_noise.py's shared pieces: the two calibrated models, the spread
of per-layer ratios, DiT-XL/2's block shapes, and candidate_fits' tables A (quality), B (cost) and C (refits)."""
import os

import torch

from bench.common import ROOT
from bundled.digits import BUNDLED_CKPT
from models import DiT_models
from quant.quant_config import QuantConfig

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


def shapes(div):  # XL_SHAPES, each side divided by div
    return {n: (o // div, i // div) for n, (o, i) in XL_SHAPES.items()}


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
