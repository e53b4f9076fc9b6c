"""Question: why does the searched alpha lose to alpha 0.5 at W4A8 (ditas, no LoRA) on the bundled digits DiT?

Answer (bench/results/alpha_search_study.md): in general it does not; the gap is one calibration draw. Over
calibration seeds 1-3 the searched alpha is better on average (30.0 vs 29.0 dB PSNR vs FP); 0.5 wins only at seed
1 (quality.md's), and the search is no defect (the built layer reproduces the search's loss to 2.6e-5). At seed 1
the per-layer objective is what is misaligned: alphas chosen by the model-output error give 31.98 dB, above alpha
0.5 (31.76); the cost sits in attn.proj and mlp.fc2, whose outputs enter the residual stream through the adaLN gate.

    OMP_NUM_THREADS=1 python bench/studies/alpha_search_study.py --part spread      # ~4 min
    OMP_NUM_THREADS=1 python bench/studies/alpha_search_study.py --part diagnose    # ~6 min
    OMP_NUM_THREADS=1 python bench/studies/alpha_search_study.py --part netloss     # ~15 min (1 thread)

Everything in-process, calibration as QuantDiT.py does it (16 labels x CFG 1.5, 10 DDPM steps, fixed
noise of --seed), quantized layers built from the same Candidates for every alpha assignment (the
fixed-0.5 model is candidate alpha=0.5 of the searched run, as QuantDiT --smoothing fixed builds it),
rounded to fp16 storage as the checkpoint is. PSNR: 100 samples, 10 steps, cfg 1.5, vs the FP model
from the same noise (bench/study.py's mean_psnr).

    spread    PSNR of searched vs alpha 0.5 for calibration seeds x sampling seeds
    diagnose  (calibration seed 1) the built layer's MSE against the search's loss (defect check);
              the alphas the layer-output loss picks on other inputs (other noise, the sampling
              batch, the quantized model's own inputs) and their PSNR; searched alpha substituted
              per layer type / in the first k blocks only (alpha 0.5 elsewhere)
    netloss   alpha per layer chosen by the model-output error instead (guided eps, one layer
              quantized at a time on the FP calibration trajectory) and its PSNR
Results: bench/results/alpha_search_study.md.
"""
import argparse
import copy
import os
import time

from ditas import threads  # first: sets OpenMP's wait policy, read when torch loads
import numpy as np
import torch
import torch.nn.functional as F
import QuantDiT
from bench.common import ROOT
from bench.study import mean_psnr
from bundled.digits import BUNDLED_FLAGS, NUM_CLASSES
from config import calib_labels
from diffusion.sampling import make_sampler, sample_inputs
from ditas.pipeline import build_model, to_uint8
from quant import fp_calibration_loop
from quant.calibration.driver import collect_tas, prepare_candidates
from quant.calibration.scoring import ExactScoring
from quant.quant_config import QuantConfig
from quant.calibration.feed import run_hooked
from quant.method.layers import quantizable_layers
from quant.nn.qlinear import QuantLinear
from quant.search.candidates import AlphaSearch, select_alpha
from quant.io.storage import round_for_storage

SHAPE = (3, 16, 16)
CFG = QuantConfig(weight_bit=4, act_bit=8, lora_rank=0)  # ditas, searched alpha, no LoRA
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:5.0f}s] {msg}", flush=True)


def fp_model():
    return build_model(QuantDiT.build_parser().parse_args(BUNDLED_FLAGS))


def calib_loop(model, seed, steps=10):
    """QuantDiT.py's calibration loop: the 16 default labels, cfg 1.5, the fixed noise of `seed`."""
    return fp_calibration_loop(model, calib_labels(NUM_CLASSES), seed=seed, steps=steps, clip_denoised=True)


def sample_loop(model, seed, n=100, steps=10):
    """sample_merge_TAS.py's sampling: random labels, per-sample noise of (seed, index)."""
    sampler = make_sampler(model, steps, 1.5, clip_denoised=True)

    def loop():
        gens, y, z = sample_inputs(seed, range(n), NUM_CLASSES, SHAPE)
        return sampler(z, y, gens)
    return loop


def calibrate(model, seed):
    """(candidates, searched index per layer): TAS pass + exact search, as quantize_dit does."""
    layers = quantizable_layers(model)
    loop = calib_loop(model, seed)
    cands, base = prepare_candidates(layers, CFG, collect_tas(layers, loop), progress=False)
    scores = ExactScoring(CFG).score(layers, cands, base, None, loop)
    return cands, {n: select_alpha(s.losses, cands[n].alphas) for n, s in scores.items()}, scores


def build(model, cands, assign):
    m = copy.deepcopy(model)
    for name, c in cands.items():
        m.set_submodule(name, QuantLinear.from_search(c.layer(assign[name]), CFG.act_cfg()))
    return round_for_storage(m)


def psnr(model, cands, assign, fp, seed):
    return mean_psnr(to_uint8(sample_loop(build(model, cands, assign), seed)()).numpy(), fp)


def local_losses(model, cands, loop):
    """{name: per-alpha layer-output loss summed over steps} on the inputs `loop` feeds model's layers."""
    layers = quantizable_layers(model)
    ss = {n: AlphaSearch(c, CFG.act_cfg()) for n, c in cands.items()}
    run_hooked(layers, lambda n, x: ss[n].update(x), loop)
    return {n: np.array(s.losses) for n, s in ss.items()}


def part_spread(model, args):
    fps = {s: to_uint8(sample_loop(model, s)()).numpy() for s in args.sample_seeds}
    rows = []
    for cs in args.calib_seeds:
        cands, srch, _ = calibrate(model, cs)
        k05 = {n: c.alphas.index(0.5) for n, c in cands.items()}
        for ss in args.sample_seeds:
            a, b = psnr(model, cands, srch, fps[ss], ss), psnr(model, cands, k05, fps[ss], ss)
            rows.append((cs, ss, a, b))
            log(f"calib seed {cs} sample seed {ss}: searched {a:.2f} dB, alpha 0.5 {b:.2f} dB")
    d = np.array([r[3] - r[2] for r in rows])
    log(f"alpha 0.5 - searched: {d.mean():.2f} +- {d.std(ddof=1):.2f} dB over {len(d)} (calib, sample) pairs")


def part_diagnose(model, args):
    cands, srch, scores = calibrate(model, 1)
    layers = quantizable_layers(model)
    alphas = next(iter(cands.values())).alphas
    k05 = {n: alphas.index(0.5) for n in cands}
    # (d) defect check: the built QuantLinear on the FP calibration inputs vs the search's loss
    built = {n: {k: QuantLinear.from_search(cands[n].layer(k), CFG.act_cfg()) for k in {srch[n], k05[n]}}
             for n in cands}
    for n in cands:
        for k, q in built[n].items():
            assert torch.equal(q.smooth, cands[n].smooth[k]) and srch[n] == int(np.argmin(scores[n].losses))
    acc = {n: {k: 0.0 for k in built[n]} for n in cands}

    def observe(n, x):
        y = F.linear(x, layers[n].weight, layers[n].bias)
        for k, q in built[n].items():
            acc[n][k] += float(((q(x) - y) ** 2).mean())
    run_hooked(layers, observe, calib_loop(model, 1))
    rel = max(abs(acc[n][k] - scores[n].losses[k]) / scores[n].losses[k] for n in cands for k in built[n])
    log(f"defect check: built layer MSE vs search loss, max relative difference {rel:.1e}; smoothing factors equal")
    fp = to_uint8(sample_loop(model, 0)()).numpy()
    log(f"searched: {psnr(model, cands, srch, fp, 0):.2f} dB; alpha 0.5: {psnr(model, cands, k05, fp, 0):.2f} dB")
    # (a, b) the layer-output loss's choice on other inputs
    sources = {"FP, calibration noise seed 1 (the search)": (model, calib_loop(model, 1)),
               "FP, calibration noise seed 2": (model, calib_loop(model, 2)),
               "FP, sampling batch (100 random labels, seed 5)": (model, sample_loop(model, 5))}
    for tag, assign in (("alpha-0.5 model", k05), ("searched model", srch)):
        q = build(model, cands, assign)
        sources[f"inputs of the quantized {tag} (calibration seed 1)"] = (q, calib_loop(q, 1))
    for tag, (m, loop) in sources.items():
        L = local_losses(m, cands, loop)
        pick = {n: select_alpha(list(v), alphas) for n, v in L.items()}
        ratio = np.mean([L[n][k05[n]] / L[n][pick[n]] for n in L])
        log(f"{tag}: {sum(pick[n] == srch[n] for n in cands)}/32 same as the search; mean loss(0.5)/loss(pick) "
            f"{ratio:.3f}; PSNR of its pick {psnr(model, cands, pick, fp, 0):.2f} dB")
    # (c) which layers' choice costs the PSNR
    for typ in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        a = {n: srch[n] if n.endswith(typ) else k05[n] for n in cands}
        log(f"searched alpha only in {typ}: {psnr(model, cands, a, fp, 0):.2f} dB")
    for b in (2, 4, 6):
        a = {n: srch[n] if int(n.split(".")[1]) < b else k05[n] for n in cands}
        log(f"searched alpha only in blocks < {b}: {psnr(model, cands, a, fp, 0):.2f} dB")


def part_netloss(model, args):
    cands, srch, _ = calibrate(model, 1)
    layers = quantizable_layers(model)
    rec, orig = [], model.forward_with_cfg

    def recording(x, t, y, cfg_scale):
        rec.append((x.clone(), t.clone(), y.clone(), cfg_scale))
        return orig(x, t, y, cfg_scale)
    model.forward_with_cfg = recording
    calib_loop(model, 1)()
    model.forward_with_cfg = orig
    ref = [orig(*r) for r in rec]
    pick = {}
    for n, c in cands.items():
        err = []
        for k in range(len(c.alphas)):
            model.set_submodule(n, QuantLinear.from_search(c.layer(k), CFG.act_cfg()))
            err.append(sum(float(((orig(*r) - o)[:, :3] ** 2).mean()) for r, o in zip(rec, ref)))
        model.set_submodule(n, layers[n])
        pick[n] = int(np.argmin(err))
        k05 = c.alphas.index(0.5)
        log(f"{n}: model-output loss picks {c.alphas[pick[n]]:g} (search {c.alphas[srch[n]]:g}); "
            f"loss(0.5)/loss(searched) {err[k05] / err[srch[n]]:.2f}")
    fp = to_uint8(sample_loop(model, 0)()).numpy()
    log(f"model-output-loss pick: {psnr(model, cands, pick, fp, 0):.2f} dB "
        f"(searched {psnr(model, cands, srch, fp, 0):.2f})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("spread", "diagnose", "netloss"), required=True)
    p.add_argument("--calib-seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--sample-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default: %(default)s; the study's numbers used 1)")
    args = p.parse_args()
    threads.set_threads(args.threads)
    torch.set_grad_enabled(False)
    os.chdir(ROOT)
    model = fp_model()
    {"spread": part_spread, "diagnose": part_diagnose, "netloss": part_netloss}[args.part](model, args)


if __name__ == "__main__":
    main()
